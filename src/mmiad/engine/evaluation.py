"""The papers' metrics for a trained run on a dataset's test split."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmiad.data.errors import DataError
from mmiad.data.formats import open_dataset
from mmiad.engine.predicting import RunModels
from mmiad.engine.runs import Log, quiet, served_categories
from mmiad.methods.base import Prediction
from mmiad.metrics import aupro_protocol, category_metrics, summarize
from mmiad.metrics.pro import AuproMode
from mmiad.utils.atomic import write_json
from mmiad.utils.names import plain_name


def evaluate_predictions(
    predictions: Sequence[Prediction], *, aupro_mode: AuproMode = "exact", num_thresholds: int = 99
) -> dict[str, float]:
    """The metrics of one category, from predictions at the model resolution (the papers' protocol)."""
    masks = [p.gt_mask if p.gt_mask is not None else np.zeros(p.anomaly_map.shape, bool) for p in predictions]
    return category_metrics(
        [p.label for p in predictions],
        [p.pred_score for p in predictions],
        masks,
        [p.map_for("aupro") for p in predictions],
        pixel_maps=[p.map_for("pixel_auroc") for p in predictions],
        aupro_mode=aupro_mode,
        num_thresholds=num_thresholds,
    )


def write_test_map(maps_dir: str | Path, category: str, prediction: Prediction) -> Path:
    """Write a test sample's map at the original resolution and its score, as the official evaluation reads them
    (``<maps>/<category>/test/<defect>/<stem>.tiff`` + ``.json``): every name checked to be a plain name (no
    ``..``, no separator), every file written atomically.

    Raises:
        UnsafeNameError: for a category, defect or stem that is not a plain name.
    """
    from mmiad.data.io import write_map
    from mmiad.data.preprocess import map_to_original

    record = prediction.record
    parts = [plain_name(n, source=record.rgb_path) for n in (category, record.defect_type, record.stem)]
    target = Path(maps_dir) / parts[0] / "test" / parts[1] / f"{parts[2]}.tiff"
    write_map(target, map_to_original(prediction.anomaly_map, prediction.geometry))
    write_json(target.with_suffix(".json"), {"score": prediction.pred_score}, indent=None)
    return target


def evaluate_run(
    run: str | Path,
    data_root: str | Path,
    *,
    categories: Sequence[str] | None = None,
    maps_dir: str | Path | None = None,
    aupro_mode: AuproMode | None = None,
    num_thresholds: int | None = None,
    cache_dir: str | None = None,
    overrides: dict[str, Any] | None = None,
    format: str | None = None,
    strict: bool = False,
    progress: bool = False,
    log: Log = quiet,
) -> tuple[dict[str, Any], list[DataError]]:
    """Metrics per category and their mean for a trained run on a dataset's test split.

    Samples are scored exactly as ``mmiad predict`` scores them (:meth:`RunModels.predict`: a sample missing a
    modality is scored by the fallback and counted, and logged with its file and reason; the result's
    ``degraded`` says how many per category; ``strict`` makes each an error instead). ``overrides`` replaces
    inference-time hyperparameters of the loaded models (e.g. ``{"aggregation": "sum"}`` rescores a CFM run
    without retraining; ``{"compat": True}`` scores it the official way). ``aupro_mode`` and ``num_thresholds``
    default to each model's protocol (:func:`mmiad.metrics.aupro_protocol`): the papers' sampled AUPRO with the
    method's threshold count for a compat model, the exact curve otherwise.
    """
    models = RunModels(run, cache_dir=cache_dir, overrides=overrides)
    dataset = open_dataset(data_root, format)
    errors: list[DataError] = []
    per_category: dict[str, dict[str, float]] = {}
    degraded = DegradedLog(log)
    for category in served_categories(run, dataset, categories):
        records = dataset.records(category, "test", errors=errors)
        predictions = []
        for prediction in models.predict(records, category, strict=strict, progress=progress, errors=errors):
            predictions.append(prediction)
            degraded.add(category, prediction)
            if maps_dir is not None:
                write_test_map(maps_dir, category, prediction)
            prediction.modality_maps.clear()
        if not predictions:
            log(f"[{category}] no usable test sample")
            continue
        model = models.trained(models.key_for(category)).model
        mode, count = aupro_protocol(
            model.name, bool(model.config.compat), mode=aupro_mode, num_thresholds=num_thresholds
        )
        per_category[category] = evaluate_predictions(predictions, aupro_mode=mode, num_thresholds=count)
        log(f"[{category}] {len(predictions)} test samples evaluated{degraded.suffix(category)}")
    return degraded.summary(summarize(per_category)), errors


class DegradedLog:
    """Every degraded test sample, logged as it is scored (file and reason) and counted per category.

    A degraded sample is scored from one modality by the fallback and counted in the metrics like the others, so
    ``test`` says which ones they were: a corrupt cloud must not pass unnoticed into the numbers.
    """

    def __init__(self, log: Log) -> None:
        self.log = log
        self.samples: dict[str, list[dict[str, str]]] = {}

    def add(self, category: str, prediction: Prediction) -> None:
        """Record (and log) ``prediction`` when it is degraded."""
        found = self.samples.setdefault(category, [])
        if prediction.degraded:
            found.append({"file": str(prediction.record.rgb_path), "note": prediction.note})
            self.log(f"[{category}] DEGRADED {prediction.record.rgb_path}: {prediction.note}")

    def suffix(self, category: str) -> str:
        """`` (N degraded: scored from one modality)`` for the category's summary line, or nothing."""
        count = len(self.samples.get(category, []))
        return f" ({count} degraded: scored from one modality)" if count else ""

    def summary(self, result: dict[str, Any]) -> dict[str, Any]:
        """``result`` with ``degraded`` (count per category) and ``degraded_samples`` (file and note of each)."""
        result["degraded"] = {category: len(self.samples.get(category, [])) for category in result["per_category"]}
        result["degraded_samples"] = [
            {"category": category, **sample} for category, found in self.samples.items() for sample in found
        ]
        return result
