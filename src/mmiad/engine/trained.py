"""A fitted model with its thresholds and fallback: building, fitting, saving, loading and predicting.

One model file holds the method's tensors, its config, the calibrated thresholds and the single-modality fallback
models; :func:`load_trained` turns it back into a :class:`TrainedModel` that :func:`predict_records` serves.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from mmiad.data.errors import DataError
from mmiad.data.sample import SampleRecord
from mmiad.methods.base import AnomalyModel, Prediction
from mmiad.methods.fallback import ModalityFallback, missing_modality, predict_degraded
from mmiad.methods.modelfile import load_model_file, save_model_file
from mmiad.methods.registry import get_method
from mmiad.postprocess.threshold import Thresholds, calibrate


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


def build_model(method: str, cache_dir: str | None, hparams: dict[str, Any] | None) -> AnomalyModel:
    """An unfitted model; an option the method does not take is a clear error, not a TypeError."""
    method_class = get_method(method)
    try:
        return method_class(cache_dir=cache_dir, **(hparams or {}))
    except TypeError as error:
        raise ValueError(f"an option does not apply to method {method!r}: {error}") from error


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
    return calibrate_model(
        model,
        train,
        calibration,
        max_fpr=max_fpr,
        source=source,
        progress=progress,
        errors=errors,
        with_fallback=with_fallback,
    )


def calibrate_model(
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
    """Thresholds of a fitted model (and its fallback, fitted on ``train``), as :func:`fit_and_calibrate` sets them.

    Shared by training and by ``mmiad import`` (a released model is fitted already; only its thresholds and
    fallback come from the user's data).
    """
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
    pipeline = trained.model.pipeline
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
    info: dict[str, Any] = {k: config[k] for k in ("category", "categories", "few_shot", "data_root") if k in config}
    trained = TrainedModel(model, thresholds, info)
    if "fallback" in config:
        trained.fallback = ModalityFallback.from_state(config["fallback"], tensors)
        trained.fallback_thresholds = {
            m: Thresholds.from_dict(t) for m, t in config["fallback"].get("thresholds", {}).items()
        }
    return trained


def apply_thresholds(prediction: Prediction, thresholds: Thresholds | None) -> Prediction:
    """Fill ``pred_label`` and ``pred_mask`` from thresholds and record which thresholds they were."""
    prediction.thresholds = thresholds
    if thresholds is not None:
        prediction.pred_label = int(prediction.pred_score > thresholds.image)
        prediction.pred_mask = prediction.anomaly_map > thresholds.pixel
    return prediction


def predict_records(
    trained: TrainedModel,
    records: Sequence[SampleRecord],
    *,
    key: str | None = None,
    progress: bool = False,
    errors: list[DataError] | None = None,
) -> Iterator[Prediction]:
    """The one way a trained model scores records: the method, the fallback for a missing modality, thresholds.

    ``test``, ``predict``, ``report`` and the Python API all score through here, so a sample whose point cloud is
    unreadable or empty (or whose RGB is unreadable) is treated the same everywhere: scored from the other
    modality by the fallback and flagged ``degraded``, with the fallback's thresholds. A sample with neither
    modality, or any bad sample when the model has no fallback, is reported in ``errors`` (or raised) and skipped.
    Each prediction records the model ``key``, the modality it was scored from and the thresholds applied.
    """
    found: list[DataError] = [] if errors is None else errors
    for record in tqdm(records, desc="predict", disable=not progress, leave=False):
        try:
            missing = missing_modality(record) if trained.fallback is not None else None
            if missing is None:
                for prediction in trained.model.predict([record], errors=found):
                    prediction.model = key
                    yield apply_thresholds(prediction, trained.thresholds)
                continue
            assert trained.fallback is not None
            prediction = predict_degraded(trained.model.pipeline, trained.fallback, record, missing)
            prediction.model = key
            yield apply_thresholds(prediction, trained.fallback_thresholds.get(prediction.modality))
        except DataError as error:
            if errors is None:
                raise
            errors.append(error)
