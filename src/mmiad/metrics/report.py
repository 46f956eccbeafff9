"""The benchmark numbers per category, their mean, and how they are shown.

I-AUROC, P-AUROC and AUPRO at the FPR limits the papers report: 30 % and 1 % (CFM, M3DM, Uni-RCM Tab. I), 10 %
and 5 % (the official CFM/Uni-RCM scripts, Uni-RCM's and G2SF's tables). All four AUPROs come from one PRO curve.

The result schema ``{"per_category": {cat: {...}}, "mean": {...}}`` is what ``mmiad evaluate`` writes as JSON, so
undefined values (a category whose test set has a single class) are ``None`` rather than NaN: ``json.dumps``
would otherwise write the non-standard token ``NaN`` that strict JSON readers reject.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mmiad.metrics.pixels import PixelScores, UndefinedMetricError
from mmiad.metrics.pro import AuproMode, aupro_many_from
from mmiad.metrics.roc import image_auroc, pixel_auroc_from

AUPRO_LIMITS = (0.3, 0.1, 0.05, 0.01)


def aupro_key(limit: float) -> str:
    """The JSON key of AUPRO up to an FPR limit: ``aupro@0.3``, ``aupro@0.1``, ``aupro@0.05``, ``aupro@0.01``."""
    return f"aupro@{limit:g}"


METRIC_KEYS = ("image_auroc", "pixel_auroc", *(aupro_key(limit) for limit in AUPRO_LIMITS))
COLUMN_TITLES = ("I-AUROC", "P-AUROC", *(f"AUPRO@{limit * 100:g}%" for limit in AUPRO_LIMITS))


def category_metrics(
    labels: Sequence[int] | np.ndarray,
    scores: Sequence[float] | np.ndarray,
    masks: Sequence[np.ndarray],
    maps: Sequence[np.ndarray],
    *,
    pixel_maps: Sequence[np.ndarray] | None = None,
    aupro_mode: AuproMode = "exact",
    num_thresholds: int = 99,
) -> dict[str, float]:
    """I-AUROC, P-AUROC and AUPRO at every limit of :data:`AUPRO_LIMITS` of one category.

    A metric that is undefined because the test set has a single class (no defective image, or no anomalous
    pixel) is NaN, so one degenerate category does not stop a whole benchmark; bad input still raises.

    Args:
        labels: Image labels, 1 = anomalous.
        scores: Image scores, higher = more anomalous.
        masks: H×W ground-truth masks, one per image (all False for good images).
        maps: H×W anomaly maps of the same shapes (AUPRO, and P-AUROC unless ``pixel_maps`` is given).
        pixel_maps: Separate maps for P-AUROC (the official code normalises them differently); None reuses
            ``maps`` and pools the pixels only once.
        aupro_mode: ``"exact"`` or ``"compat"`` (see :mod:`mmiad.metrics.pro`).
        num_thresholds: Sampled thresholds in compat mode.

    Raises:
        ValueError: mismatched inputs, shape mismatch (naming the index) or NaN scores.
    """
    result = dict.fromkeys(METRIC_KEYS, math.nan)
    with contextlib.suppress(UndefinedMetricError):
        result["image_auroc"] = image_auroc(labels, scores)
    pixels = PixelScores.from_maps(masks, maps)
    try:
        result["pixel_auroc"] = pixel_auroc_from(
            pixels if pixel_maps is None else PixelScores.from_maps(masks, pixel_maps)
        )
        by_limit = aupro_many_from(pixels, AUPRO_LIMITS, mode=aupro_mode, num_thresholds=num_thresholds)
    except UndefinedMetricError:
        return result
    result.update({aupro_key(limit): value for limit, value in by_limit.items()})
    return result


def _json_number(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def summarize(per_category: Mapping[str, Mapping[str, float | None]]) -> dict[str, Any]:
    """Per-category metrics plus their unweighted mean, as JSON-safe data (undefined values become None).

    A category without a value for a metric is left out of that metric's mean only, so the mean of the other
    metrics still covers every category.
    """
    rows = {
        category: {key: _json_number(metrics.get(key)) for key in METRIC_KEYS}
        for category, metrics in per_category.items()
    }
    mean: dict[str, float | None] = {}
    for key in METRIC_KEYS:
        values = [float(v) for v in (row[key] for row in rows.values()) if v is not None]
        mean[key] = float(sum(values) / len(values)) if values else None
    return {"per_category": rows, "mean": mean}


def format_table(result: Mapping[str, Any]) -> str:
    """A fixed-width table of a :func:`summarize` result: one row per category and a ``mean`` row."""
    per_category: Mapping[str, Mapping[str, float | None]] = result["per_category"]
    name_width = max([len("category"), len("mean"), *(len(name) for name in per_category)])
    widths = [max(len(title), 7) for title in COLUMN_TITLES]

    def line(name: str, cells: Sequence[str]) -> str:
        padded = (cell.rjust(width) for cell, width in zip(cells, widths, strict=True))
        return "  ".join([name.ljust(name_width), *padded])

    def numbers(metrics: Mapping[str, float | None]) -> list[str]:
        values = [_json_number(metrics.get(key)) for key in METRIC_KEYS]
        return ["-" if value is None else f"{value:.3f}" for value in values]

    header = line("category", COLUMN_TITLES)
    lines = [header, "-" * len(header)]
    lines += [line(name, numbers(metrics)) for name, metrics in per_category.items()]
    lines += ["-" * len(header), line("mean", numbers(result["mean"]))]
    return "\n".join(lines)
