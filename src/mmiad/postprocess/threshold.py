"""Decision thresholds calibrated on held-out nominal samples.

A line engineer sets the false-alarm rate they can live with (``max_fpr``); the threshold is the smallest score
that flags at most that fraction of held-out *nominal* samples. No defective sample is needed, which matches the
unsupervised setting: defects are rare and unknown at training time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def finite_threshold(value: object, what: str) -> float:
    """``value`` as a finite float, or a ValueError naming ``what``.

    A NaN threshold makes every ``score > t`` comparison false, so every sample would be labelled good: thresholds
    fail closed instead, wherever they come from (calibration, a model file, the command line).
    """
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating | np.integer):
        raise ValueError(f"{what} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{what} must be finite, got {number}")
    return number


def threshold_for_fpr(nominal_scores: Sequence[float] | np.ndarray, max_fpr: float) -> float:
    """The smallest threshold t such that the fraction of nominal scores strictly above t is at most ``max_fpr``.

    A score is flagged anomalous when ``score > t``. With n scores, ``floor(max_fpr * n)`` of them may exceed t,
    so t is the order statistic just below them.

    Raises:
        ValueError: without scores, with a non-finite score (NaN sorts last and would become the threshold, which
            then labels everything good), or with ``max_fpr`` outside [0, 1).
    """
    scores = np.sort(np.asarray(nominal_scores, dtype=np.float64).ravel())
    if scores.size == 0:
        raise ValueError("cannot calibrate a threshold without nominal scores")
    bad = int(np.count_nonzero(~np.isfinite(scores)))
    if bad:
        raise ValueError(f"cannot calibrate a threshold: {bad} of {scores.size} nominal scores are not finite")
    if not 0.0 <= max_fpr < 1.0:
        raise ValueError(f"max_fpr must be in [0, 1), got {max_fpr}")
    allowed = int(np.floor(max_fpr * scores.size + 1e-9))
    return float(scores[scores.size - 1 - allowed])


@dataclass(frozen=True)
class Thresholds:
    """Image and pixel thresholds with the false-positive rate they were calibrated for.

    Attributes:
        image: Image score above which a sample is flagged anomalous.
        pixel: Map value above which a pixel is part of the predicted defect mask.
        max_fpr: The target false-positive rate on nominal held-out data.
        source: Which samples they were calibrated on (``validation`` or ``train-holdout``).
    """

    image: float
    pixel: float
    max_fpr: float
    source: str

    def __post_init__(self) -> None:
        finite_threshold(self.image, "the image threshold")
        finite_threshold(self.pixel, "the pixel threshold")

    def to_dict(self) -> dict[str, float | str]:
        """JSON-ready form (stored in model files)."""
        return {"image": self.image, "pixel": self.pixel, "max_fpr": self.max_fpr, "source": self.source}

    @classmethod
    def from_dict(cls, data: dict) -> Thresholds:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: a field is missing, not a number, or a threshold is not finite (names the field).
        """
        if not isinstance(data, dict):
            raise ValueError(f"thresholds must be a JSON object, got {type(data).__name__}")
        missing = [k for k in ("image", "pixel", "max_fpr") if k not in data]
        if missing:
            raise ValueError(f"thresholds lack {', '.join(missing)}")
        max_fpr = data["max_fpr"]
        if isinstance(max_fpr, bool) or not isinstance(max_fpr, int | float):
            raise ValueError(f"thresholds.max_fpr must be a number, got {max_fpr!r}")
        return cls(
            finite_threshold(data["image"], "thresholds.image"),
            finite_threshold(data["pixel"], "thresholds.pixel"),
            float(max_fpr),
            str(data.get("source", "")),
        )


def calibrate(
    image_scores: Sequence[float], pixel_maps: Sequence[np.ndarray], max_fpr: float, source: str
) -> Thresholds:
    """Image threshold from image scores; pixel threshold from all pixels of the nominal maps."""
    pixels = np.concatenate([np.asarray(m, dtype=np.float32).ravel() for m in pixel_maps])
    return Thresholds(
        image=threshold_for_fpr(image_scores, max_fpr),
        pixel=threshold_for_fpr(pixels, max_fpr),
        max_fpr=max_fpr,
        source=source,
    )
