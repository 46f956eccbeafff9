"""The papers' metrics for a trained run on a dataset's test split."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmiad.data.errors import DataError
from mmiad.data.formats import open_dataset
from mmiad.engine.predicting import RunModels
from mmiad.engine.runs import Log, quiet, served_categories
from mmiad.methods.base import Prediction
from mmiad.metrics import aupro_many, image_auroc, pixel_auroc, summarize


def evaluate_predictions(
    predictions: Sequence[Prediction], *, aupro_mode: str = "exact", num_thresholds: int = 99
) -> dict[str, float]:
    """The four metrics of one category, from predictions at the model resolution (the papers' protocol)."""
    labels = [p.label for p in predictions]
    masks = [p.gt_mask if p.gt_mask is not None else np.zeros(p.anomaly_map.shape, bool) for p in predictions]
    result = {"image_auroc": float("nan"), "pixel_auroc": float("nan"), "aupro@0.3": float("nan")}
    result["aupro@0.01"] = float("nan")
    if len(set(labels)) == 2:
        result["image_auroc"] = image_auroc(labels, [p.pred_score for p in predictions])
    if any(m.any() for m in masks):
        result["pixel_auroc"] = pixel_auroc(masks, [p.map_for("pixel_auroc") for p in predictions])
        curves = aupro_many(
            masks,
            [p.map_for("aupro") for p in predictions],
            limits=(0.3, 0.01),
            mode=aupro_mode,
            num_thresholds=num_thresholds,
        )
        result["aupro@0.3"], result["aupro@0.01"] = curves[0.3], curves[0.01]
    return result


def evaluate_run(
    run: str | Path,
    data_root: str | Path,
    *,
    categories: Sequence[str] | None = None,
    maps_dir: str | Path | None = None,
    aupro_mode: str = "exact",
    num_thresholds: int = 99,
    cache_dir: str | None = None,
    overrides: dict[str, Any] | None = None,
    format: str | None = None,
    progress: bool = False,
    log: Log = quiet,
) -> tuple[dict[str, Any], list[DataError]]:
    """Metrics per category and their mean for a trained run on a dataset's test split.

    Samples are scored exactly as ``mmiad predict`` scores them (:meth:`RunModels.predict`: a sample missing a
    modality is scored by the fallback and counted). ``overrides`` replaces inference-time hyperparameters of
    the loaded models (e.g. ``{"aggregation": "sum"}`` rescores a CFM run without retraining).
    """
    from mmiad.data.io import write_map
    from mmiad.data.preprocess import map_to_original

    models = RunModels(run, cache_dir=cache_dir, overrides=overrides)
    dataset = open_dataset(data_root, format)
    errors: list[DataError] = []
    per_category: dict[str, dict[str, float]] = {}
    for category in served_categories(run, dataset, categories):
        records = dataset.records(category, "test", errors=errors)
        predictions = []
        for prediction in models.predict(records, category, progress=progress, errors=errors):
            predictions.append(prediction)
            if maps_dir is not None:
                record = prediction.record
                target = Path(maps_dir) / category / "test" / record.defect_type / f"{record.stem}.tiff"
                write_map(target, map_to_original(prediction.anomaly_map, prediction.geometry))
                target.with_suffix(".json").write_text(json.dumps({"score": prediction.pred_score}))
            prediction.modality_maps.clear()
        if not predictions:
            log(f"[{category}] no usable test sample")
            continue
        per_category[category] = evaluate_predictions(predictions, aupro_mode=aupro_mode, num_thresholds=num_thresholds)
        log(f"[{category}] {len(predictions)} test samples evaluated")
    return summarize(per_category), errors
