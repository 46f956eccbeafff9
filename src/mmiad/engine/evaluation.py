"""The papers' metrics for a trained run on a dataset's test split."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmiad.data.errors import DataError
from mmiad.data.mvtec3d import list_records
from mmiad.engine.runs import Log, model_for, quiet, run_models, served_categories
from mmiad.engine.trained import TrainedModel, apply_thresholds, load_trained
from mmiad.methods.base import Prediction
from mmiad.metrics import aupro_protocol, category_metrics, summarize


def evaluate_predictions(
    predictions: Sequence[Prediction], *, aupro_mode: str = "exact", num_thresholds: int = 99
) -> dict[str, float]:
    """The metrics of one category, from predictions at the model resolution (the papers' protocol)."""
    masks = [p.gt_mask if p.gt_mask is not None else np.zeros(p.anomaly_map.shape, bool) for p in predictions]
    return category_metrics(
        [p.label for p in predictions],
        [p.pred_score for p in predictions],
        masks,
        [p.map_for("aupro") for p in predictions],
        pixel_maps=[p.map_for("pixel_auroc") for p in predictions],
        aupro_mode=aupro_mode,  # type: ignore[arg-type]
        num_thresholds=num_thresholds,
    )


def evaluate_run(
    run: str | Path,
    data_root: str | Path,
    *,
    categories: Sequence[str] | None = None,
    maps_dir: str | Path | None = None,
    aupro_mode: str | None = None,
    num_thresholds: int | None = None,
    cache_dir: str | None = None,
    overrides: dict[str, Any] | None = None,
    progress: bool = False,
    log: Log = quiet,
) -> tuple[dict[str, Any], list[DataError]]:
    """Metrics per category and their mean for a trained run on a dataset's test split.

    ``overrides`` replaces inference-time hyperparameters of the loaded models (e.g. ``{"aggregation": "sum"}``
    rescores a CFM run without retraining; ``{"compat": True}`` scores it the official way). ``aupro_mode`` and
    ``num_thresholds`` default to each model's protocol (:func:`mmiad.metrics.aupro_protocol`): the papers'
    sampled AUPRO with the method's threshold count for a compat model, the exact curve otherwise.
    """
    from mmiad.data.io import write_map
    from mmiad.data.preprocess import map_to_original

    root = Path(data_root)
    models = run_models(run)
    names = served_categories(run, root, categories)
    errors: list[DataError] = []
    per_category: dict[str, dict[str, float]] = {}
    loaded: dict[Path, TrainedModel] = {}
    for category in names:
        path = model_for(models, category)
        if path not in loaded:
            loaded[path] = load_trained(path, cache_dir=cache_dir, **(overrides or {}))
        trained = loaded[path]
        records = list_records(root, category, "test", errors=errors)
        predictions = []
        for prediction in trained.model.predict(records, progress=progress, errors=errors):
            predictions.append(apply_thresholds(prediction, trained.thresholds))
            if maps_dir is not None:
                record = prediction.record
                target = Path(maps_dir) / category / "test" / record.defect_type / f"{record.stem}.tiff"
                write_map(target, map_to_original(prediction.anomaly_map, prediction.geometry))
                target.with_suffix(".json").write_text(json.dumps({"score": prediction.pred_score}))
            prediction.modality_maps.clear()
        if not predictions:
            log(f"[{category}] no usable test sample")
            continue
        mode, count = aupro_protocol(
            trained.model.name,
            bool(getattr(getattr(trained.model, "config", None), "compat", False)),
            mode=aupro_mode,  # type: ignore[arg-type]
            num_thresholds=num_thresholds,
        )
        per_category[category] = evaluate_predictions(predictions, aupro_mode=mode, num_thresholds=count)
        log(f"[{category}] {len(predictions)} test samples evaluated")
    return summarize(per_category), errors
