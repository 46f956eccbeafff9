"""Train, test and predict over a dataset: the loop every method shares, behind the CLI and the Python API.

A *run* is a folder with one self-describing model file per trained model (``<category>.safetensors``, or
``unified.safetensors`` for a model of all categories) and a ``run.json`` index. Thresholds are calibrated at the
end of training on held-out nominal samples and stored in the model file, so a run folder is all a line PC needs.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from mmiad.data.errors import DataError
from mmiad.data.mvtec3d import list_categories, list_records
from mmiad.data.sample import SampleRecord
from mmiad.methods.base import AnomalyModel, Prediction, get_method
from mmiad.methods.fallback import ModalityFallback, missing_modality, predict_degraded
from mmiad.methods.modelfile import ModelFileError, load_model_file, save_model_file
from mmiad.metrics import aupro_many, image_auroc, pixel_auroc, summarize
from mmiad.postprocess.threshold import Thresholds, calibrate
from mmiad.utils import distributed as ddp

RUN_INDEX = "run.json"
UNIFIED = "unified"
Log = Callable[[str], None]


def _quiet(_: str) -> None:
    return None


@dataclass
class TrainedModel:
    """A fitted model with its calibrated thresholds and the facts stored beside it.

    Attributes:
        model: The fitted method.
        thresholds: Calibrated image and pixel thresholds of the full (multimodal) model.
        info: Category, few-shot draw, data root.
        fallback: Single-modality models for sensor drop-outs, or None.
        fallback_thresholds: Their thresholds, per present modality (``2d``, ``3d``).
    """

    model: AnomalyModel
    thresholds: Thresholds | None
    info: dict[str, Any] = field(default_factory=dict)
    fallback: ModalityFallback | None = None
    fallback_thresholds: dict[str, Thresholds] = field(default_factory=dict)


def select_few_shot(records: Sequence[SampleRecord], shots: int, seed: int) -> tuple[list[SampleRecord], list[int]]:
    """k nominal samples drawn without replacement by a seeded generator; the indices are recorded in the model."""
    if shots <= 0:
        raise ValueError(f"--shots must be positive, got {shots}")
    if shots >= len(records):
        return list(records), list(range(len(records)))
    indices = sorted(np.random.default_rng(seed).choice(len(records), size=shots, replace=False).tolist())
    return [records[i] for i in indices], indices


def calibration_split(
    root: Path, category: str, train: list[SampleRecord], errors: list[DataError]
) -> tuple[list[SampleRecord], list[SampleRecord], str]:
    """(training records, calibration records, source): the validation split, else a held-out tenth of train."""
    validation = list_records(root, category, "validation", errors=errors)
    if validation:
        return train, validation, "validation"
    if len(train) >= 5:
        held_out = max(1, len(train) // 10)
        return train[:-held_out], train[-held_out:], "train-holdout"
    return train, train, "train (no held-out nominal samples; thresholds are optimistic)"


def fit_and_calibrate(
    model: AnomalyModel,
    train: Sequence[SampleRecord],
    calibration: Sequence[SampleRecord],
    *,
    max_fpr: float,
    source: str,
    progress: bool,
    errors: list[DataError],
    with_fallback: bool = True,
) -> TrainedModel:
    """Fit on nominal samples, then set thresholds so at most ``max_fpr`` of held-out nominal samples alarm.

    With ``with_fallback`` the single-modality fallback models are fitted on the same (cached) features and
    calibrated the same way, so a degraded prediction still gets a meaningful label.
    """
    model.fit(train, progress=progress, errors=errors)
    held_out = list(model.predict(calibration, progress=progress, errors=errors))
    if not held_out:
        raise ValueError("no usable held-out nominal sample to calibrate thresholds on")
    thresholds = calibrate([p.pred_score for p in held_out], [p.anomaly_map for p in held_out], max_fpr, source)
    trained = TrainedModel(model, thresholds)
    if with_fallback and getattr(model, "pipeline", None) is not None:
        fit_fallback(trained, train, calibration, max_fpr=max_fpr, source=source)
    return trained


def fit_fallback(
    trained: TrainedModel,
    train: Sequence[SampleRecord],
    calibration: Sequence[SampleRecord],
    *,
    max_fpr: float,
    source: str,
) -> None:
    """Fit and calibrate the single-modality fallback models on the model's (cached) nominal features."""
    pipeline = trained.model.pipeline  # type: ignore[attr-defined]
    prepared = pipeline.preprocess(train, errors=[])
    trained.fallback = ModalityFallback().fit(f for _, f in pipeline.iter_features(prepared, errors=[]))
    for missing, present in (("3d", "2d"), ("2d", "3d")):
        degraded = []
        for record in calibration:
            try:
                degraded.append(predict_degraded(pipeline, trained.fallback, record, missing))
            except DataError:
                continue
        if degraded:
            trained.fallback_thresholds[present] = calibrate(
                [p.pred_score for p in degraded], [p.anomaly_map for p in degraded], max_fpr, source
            )


def save_trained(path: Path, trained: TrainedModel) -> Path:
    """Write one model file: weights + config + thresholds + training facts (+ the fallback models)."""
    config = {**trained.model.get_config(), **trained.info}
    tensors = trained.model.state_tensors()
    if trained.thresholds is not None:
        config["thresholds"] = trained.thresholds.to_dict()
    if trained.fallback is not None:
        thresholds = {m: t.to_dict() for m, t in trained.fallback_thresholds.items()}
        config["fallback"] = {**trained.fallback.config(), "thresholds": thresholds}
        tensors = {**tensors, **trained.fallback.state_tensors()}
    return save_model_file(path, tensors, config)


def load_trained(path: str | Path, **overrides: Any) -> TrainedModel:
    """Read one model file back into a fitted model."""
    tensors, config = load_model_file(path)
    method = get_method(config.get("method", ""))
    own = {k: v for k, v in tensors.items() if not k.startswith("fallback.")}
    model = method.from_state(config, own, **overrides)
    thresholds = Thresholds.from_dict(config["thresholds"]) if "thresholds" in config else None
    info = {k: config[k] for k in ("category", "categories", "few_shot", "data_root") if k in config}
    trained = TrainedModel(model, thresholds, info)
    if "fallback" in config:
        trained.fallback = ModalityFallback.from_state(config["fallback"], tensors)
        trained.fallback_thresholds = {
            m: Thresholds.from_dict(t) for m, t in config["fallback"].get("thresholds", {}).items()
        }
    return trained


def predict_records(
    trained: TrainedModel,
    records: Sequence[SampleRecord],
    *,
    progress: bool = False,
    errors: list[DataError] | None = None,
) -> Iterator[Prediction]:
    """Predictions with thresholds applied; a sample missing one modality is scored by the fallback.

    A sample whose point cloud is unreadable or empty (or whose RGB is unreadable) is scored from the other
    modality and flagged ``degraded``; a sample with neither, or any sample when the model has no fallback, is
    reported in ``errors`` (or raised) and skipped.
    """
    found: list[DataError] = [] if errors is None else errors
    for record in tqdm(records, desc="predict", disable=not progress, leave=False):
        try:
            missing = missing_modality(record) if trained.fallback is not None else None
            if missing is None:
                for prediction in trained.model.predict([record], errors=found):
                    yield apply_thresholds(prediction, trained.thresholds)
                continue
            prediction = predict_degraded(trained.model.pipeline, trained.fallback, record, missing)
            present = "2d" if missing == "3d" else "3d"
            yield apply_thresholds(prediction, trained.fallback_thresholds.get(present))
        except DataError as error:
            if errors is None:
                raise
            errors.append(error)


def _category_splits(
    root: Path, names: Sequence[str], shots: int | None, seed: int, errors: list[DataError]
) -> dict[str, tuple[list[SampleRecord], list[SampleRecord], str, dict[str, Any]]]:
    """Per category: (training records, calibration records, calibration source, facts for the model file)."""
    splits = {}
    for category in names:
        train = list_records(root, category, "train", errors=errors)
        if not train:
            raise DataError(root / category / "train", "no training samples found")
        train, calibration, source = calibration_split(root, category, train, errors)
        info: dict[str, Any] = {}
        if shots:
            train, indices = select_few_shot(train, shots, seed)
            info["few_shot"] = {"shots": shots, "seed": seed, "indices": indices, "stems": [r.stem for r in train]}
        splits[category] = (train, calibration, source, info)
    return splits


def train_run(
    method: str,
    data_root: str | Path,
    out: str | Path,
    *,
    categories: Sequence[str] | None = None,
    unified: bool = False,
    shots: int | None = None,
    seed: int = 0,
    max_fpr: float = 0.01,
    hparams: dict[str, Any] | None = None,
    cache_dir: str | None = None,
    fallback: bool = True,
    progress: bool = False,
    log: Log = _quiet,
) -> tuple[dict[str, Path], list[DataError]]:
    """Train one model per category (or one ``unified`` model on all of them) and write the run folder.

    A unified model sees the union of the categories' nominal samples with no category label, as Uni-RCM's
    multi-class setting; its thresholds are calibrated on the union of the held-out nominal samples.

    Returns:
        (model file per category key, the bad samples that were skipped).
    """
    root, out = Path(data_root), Path(out)
    names = list(categories) if categories else list_categories(root)
    if not names:
        raise DataError(root, "no category found (expected <root>/<category>/train/good/{rgb,xyz})")
    errors: list[DataError] = []
    build_model(method, cache_dir, hparams)  # fail on a bad option before any work
    distributed = ddp.init_from_env()
    splits = _category_splits(root, names, shots, seed, errors)
    groups = {UNIFIED: names} if unified else {category: [category] for category in names}
    files: dict[str, Path] = {}
    for key, members in groups.items():
        train = [r for c in members for r in splits[c][0]]
        calibration = [r for c in members for r in splits[c][1]]
        sources = sorted({splits[c][2] for c in members})
        info: dict[str, Any] = {"data_root": str(root.resolve())}
        info.update({"categories": members} if unified else {"category": key, **splits[key][3]})
        if unified and shots:
            info["few_shot"] = {c: splits[c][3]["few_shot"] for c in members}
        log(f"[{key}] training {method} on {len(train)} nominal samples")
        model = build_model(method, cache_dir, hparams)
        trained = fit_and_calibrate(
            model,
            train,
            calibration,
            max_fpr=max_fpr,
            source=", ".join(sources),
            progress=progress,
            errors=errors,
            with_fallback=fallback,
        )
        trained.info = info
        files[key] = out / f"{key}.safetensors"
        if ddp.is_main_process():
            save_trained(files[key], trained)
            threshold = trained.thresholds.image if trained.thresholds else float("nan")
            log(f"[{key}] saved {files[key]} (image threshold {threshold:.4g} from {', '.join(sources)})")
    if ddp.is_main_process():
        write_run_index(out, method, unified, names, files)
    if distributed:
        ddp.barrier()
    return files, errors


def write_run_index(out: Path, method: str, unified: bool, categories: Sequence[str], files: dict[str, Path]) -> None:
    """``run.json``: which model file serves which category."""
    index = {
        "method": method,
        "unified": unified,
        "categories": list(categories),
        "models": {k: v.name for k, v in files.items()},
    }
    (out / RUN_INDEX).write_text(json.dumps(index, indent=2))


def build_model(method: str, cache_dir: str | None, hparams: dict[str, Any] | None) -> AnomalyModel:
    """An unfitted model; an option the method does not take is a clear error, not a TypeError."""
    method_class = get_method(method)
    try:
        return method_class(cache_dir=cache_dir, **(hparams or {}))
    except TypeError as error:
        raise ValueError(f"an option does not apply to method {method!r}: {error}") from error


def extend_run(
    run: str | Path,
    data_root: str | Path,
    new_categories: Sequence[str],
    *,
    epochs: int,
    max_fpr: float = 0.01,
    cache_dir: str | None = None,
    progress: bool = False,
    log: Log = _quiet,
) -> tuple[Path, list[DataError]]:
    """Add categories to a trained unified model in place (``mmiad train --resume RUN --add-categories ...``).

    The method extends what it learned (Uni-RCM: new ORQ codes, fine-tuning with replay of the earlier
    categories' training samples, whose features come from the feature cache) and the thresholds are
    recalibrated on the held-out nominal samples of all categories.
    """
    root, run = Path(data_root), Path(run)
    models = run_models(run)
    if UNIFIED not in models:
        raise ModelFileError(f"{run}: --add-categories needs a unified run (train it with --unified)")
    trained = load_trained(models[UNIFIED], cache_dir=cache_dir)
    extend = getattr(trained.model, "extend", None)
    if extend is None:
        raise ValueError(f"method {trained.model.name!r} cannot add categories to a trained model; retrain it")
    known = list(trained.info.get("categories", []))
    added = [c for c in new_categories if c not in known]
    if not added:
        raise ValueError(f"nothing to add: the model already serves {', '.join(known)}")
    errors: list[DataError] = []
    splits = _category_splits(root, [*known, *added], None, 0, errors)
    new = [r for c in added for r in splits[c][0]]
    replay = [r for c in known for r in splits[c][0]]
    log(f"[unified] adding {', '.join(added)} ({len(new)} samples) with {len(replay)} replayed samples")
    extend(new, replay, epochs=epochs, progress=progress, errors=errors)
    calibration = [r for c in [*known, *added] for r in splits[c][1]]
    held_out = list(trained.model.predict(calibration, progress=progress, errors=errors))
    thresholds = calibrate(
        [p.pred_score for p in held_out], [p.anomaly_map for p in held_out], max_fpr, "validation (after extend)"
    )
    trained.thresholds = thresholds
    trained.info = {**trained.info, "categories": [*known, *added]}
    if trained.fallback is not None:
        fit_fallback(trained, [*replay, *new], calibration, max_fpr=max_fpr, source="validation (after extend)")
    path = save_trained(models[UNIFIED], trained)
    index = json.loads((run / RUN_INDEX).read_text())
    write_run_index(run, index["method"], True, [*known, *added], {UNIFIED: path})
    return path, errors


def run_models(run: str | Path) -> dict[str, Path]:
    """Model file per category key of a run folder (``unified`` for a model of all categories)."""
    run = Path(run)
    index_path = run / RUN_INDEX
    if not index_path.is_file():
        raise ModelFileError(f"{run}: not a run folder (no {RUN_INDEX}); train one with `mmiad train`")
    index = json.loads(index_path.read_text())
    return {key: run / name for key, name in index["models"].items()}


def model_for(models: dict[str, Path], category: str) -> Path:
    """The model that serves ``category``: its own, or the unified one."""
    if category in models:
        return models[category]
    if UNIFIED in models:
        return models[UNIFIED]
    raise ModelFileError(f"the run has no model for category {category!r}; it has: {', '.join(sorted(models))}")


def apply_thresholds(prediction: Prediction, thresholds: Thresholds | None) -> Prediction:
    """Fill ``pred_label`` and ``pred_mask`` from calibrated thresholds."""
    if thresholds is not None:
        prediction.pred_label = int(prediction.pred_score > thresholds.image)
        prediction.pred_mask = prediction.anomaly_map > thresholds.pixel
    return prediction


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
    progress: bool = False,
    log: Log = _quiet,
) -> tuple[dict[str, Any], list[DataError]]:
    """Metrics per category and their mean for a trained run on a dataset's test split.

    ``overrides`` replaces inference-time hyperparameters of the loaded models (e.g. ``{"aggregation": "sum"}``
    rescores a CFM run without retraining).
    """
    from mmiad.data.io import write_map
    from mmiad.data.preprocess import map_to_original

    root = Path(data_root)
    models = run_models(run)
    names = list(categories) if categories else [c for c in list_categories(root) if c in models or UNIFIED in models]
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
        per_category[category] = evaluate_predictions(predictions, aupro_mode=aupro_mode, num_thresholds=num_thresholds)
        log(f"[{category}] {len(predictions)} test samples evaluated")
    return summarize(per_category), errors
