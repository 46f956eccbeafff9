"""Zero-shot methods (MuSc-V2): score a batch with no training, and label it without calibrated thresholds.

A trained method carries thresholds calibrated on nominal data; a zero-shot method has seen no data before the
batch it scores, and its scores are relative to that batch. Samples are labelled by a robust outlier rule over the
batch instead: anomalous when the score exceeds ``median + k · 1.4826 · MAD`` of the batch's scores (k = 3 by
default; 1.4826·MAD estimates the standard deviation of the nominal majority without being pulled up by the
defects). The rule assumes most of the batch is nominal; ``--threshold`` overrides it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmiad.data.errors import DataError
from mmiad.data.sample import SampleRecord
from mmiad.engine.evaluation import evaluate_predictions
from mmiad.engine.runs import Log, quiet
from mmiad.methods.base import Prediction
from mmiad.metrics.pro import AuproMode
from mmiad.postprocess.threshold import Thresholds

#: Methods that need no training; ``train`` refuses them with a pointer to ``test``/``predict``.
ZERO_SHOT_METHODS = ("musc",)
OUTLIER_K = 3.0


def score_zero_shot(
    records: Sequence[SampleRecord],
    hparams: dict[str, Any] | None = None,
    *,
    method: str = "musc",
    cache_dir: str | None = None,
    progress: bool = False,
    errors: list[DataError] | None = None,
) -> list[Prediction]:
    """Predictions for one batch scored by mutual scoring (no run, no training), in input order."""
    if method not in ZERO_SHOT_METHODS:
        raise ValueError(f"{method!r} is not a zero-shot method; zero-shot methods: {', '.join(ZERO_SHOT_METHODS)}")
    from mmiad.methods.musc import MuSc

    return MuSc(cache_dir=cache_dir, **(hparams or {})).score(records, progress=progress, errors=errors)


def robust_threshold(values: Sequence[float] | np.ndarray, k: float = OUTLIER_K) -> float:
    """``median + k · 1.4826 · MAD`` of ``values``: the level above which a value is an outlier of the batch."""
    data = np.asarray(values, dtype=np.float64).ravel()
    if data.size == 0:
        raise ValueError("cannot derive a threshold from no scores")
    median = float(np.median(data))
    return median + k * 1.4826 * float(np.median(np.abs(data - median)))


def batch_thresholds(
    predictions: Sequence[Prediction], k: float = OUTLIER_K, image_threshold: float | None = None
) -> Thresholds:
    """Image threshold by the outlier rule over the image scores (or ``image_threshold``); pixel threshold by the
    same rule over the maxima of the maps, so a masked pixel is one that alone would make its image an outlier."""
    image = robust_threshold([p.pred_score for p in predictions], k) if image_threshold is None else image_threshold
    pixel = robust_threshold([float(p.anomaly_map.max()) for p in predictions], k)
    return Thresholds(image, pixel, float("nan"), "user" if image_threshold is not None else f"batch-mad-k{k:g}")


def label_batch(predictions: Sequence[Prediction], thresholds: Thresholds) -> None:
    """Set ``pred_label``/``pred_mask`` (and the thresholds used) of each prediction, in place."""
    from mmiad.engine.trained import apply_thresholds

    for prediction in predictions:
        apply_thresholds(prediction, thresholds)


def evaluate_zero_shot(
    data_root: str | Path,
    hparams: dict[str, Any] | None = None,
    *,
    method: str = "musc",
    categories: Sequence[str] | None = None,
    maps_dir: str | Path | None = None,
    aupro_mode: AuproMode | None = None,
    num_thresholds: int | None = None,
    cache_dir: str | None = None,
    format: str | None = None,
    progress: bool = False,
    log: Log = quiet,
) -> tuple[dict[str, Any], list[DataError]]:
    """Metrics per category, each category's test split scored as one batch (the paper's protocol)."""
    from mmiad.data.formats import open_dataset
    from mmiad.data.io import write_map
    from mmiad.data.preprocess import map_to_original
    from mmiad.metrics import summarize

    dataset = open_dataset(data_root, format)
    names = list(categories) if categories else dataset.categories()
    errors: list[DataError] = []
    per_category: dict[str, dict[str, float]] = {}
    for category in names:
        records = dataset.records(category, "test", errors=errors)
        predictions = score_zero_shot(
            records, hparams, method=method, cache_dir=cache_dir, progress=progress, errors=errors
        )
        if maps_dir is not None:
            for prediction in predictions:
                record = prediction.record
                target = Path(maps_dir) / category / "test" / record.defect_type / f"{record.stem}.tiff"
                write_map(target, map_to_original(prediction.anomaly_map, prediction.geometry))
                target.with_suffix(".json").write_text(json.dumps({"score": prediction.pred_score}))
        per_category[category] = evaluate_predictions(
            predictions, aupro_mode=aupro_mode or "exact", num_thresholds=num_thresholds or 99
        )
        log(f"[{category}] {len(predictions)} test samples scored zero-shot ({method})")
    return summarize(per_category), errors
