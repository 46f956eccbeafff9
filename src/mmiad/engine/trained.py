"""A fitted model with its thresholds and fallback: building, fitting, saving, loading and predicting.

One model file holds the method's tensors, its config, the calibrated thresholds and the single-modality fallback
models; :func:`load_trained` turns it back into a :class:`TrainedModel` that :func:`predict_records` serves.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmiad.data.errors import DataError
from mmiad.data.sample import SampleRecord
from mmiad.engine.checks import check_fallback_widths, check_trained_config
from mmiad.engine.reading import rgb_only_input
from mmiad.engine.scoring import score_records
from mmiad.features.pipeline import FeaturePipeline, SampleFeatures
from mmiad.methods.base import AnomalyModel, Prediction, check_finite
from mmiad.methods.fallback import ModalityFallback
from mmiad.methods.hparams import build_settings, check_overrides
from mmiad.methods.modelfile import ModelFileError, load_model_file, one_line, save_model_file
from mmiad.methods.registry import available_methods, get_method
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
    """An unfitted model, every hyperparameter checked against its config field's type and range first.

    Raises:
        HparamError: one line naming the key, the value and what is allowed (an unknown key lists the valid ones).
    """
    method_class = get_method(method)
    settings = build_settings(method_class.config_class, hparams or {}, owner=method)
    return method_class(settings, cache_dir=cache_dir)


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
    trained = TrainedModel(model, None)
    if with_fallback and getattr(model, "pipeline", None) is not None:
        trained.fallback = _fit_fallback_models(model, train, errors)
    fallback_scores = _FallbackScores(trained.fallback, model.pipeline if trained.fallback is not None else None)
    scored = score_records(
        model,
        calibration,
        fallback=trained.fallback,
        progress=progress,
        errors=errors,
        observe=fallback_scores if trained.fallback is not None else None,
    )
    held_out = [p for p in scored if not p.degraded]  # a degraded sample calibrates only its fallback
    if not held_out:
        raise ValueError("no usable held-out nominal sample to calibrate thresholds on")
    trained.thresholds = calibrate([p.pred_score for p in held_out], [p.anomaly_map for p in held_out], max_fpr, source)
    if trained.fallback is not None:
        _calibrate_fallback(trained, fallback_scores, max_fpr=max_fpr, source=source, errors=errors)
    return trained


def _fit_fallback_models(
    model: AnomalyModel, train: Sequence[SampleRecord], errors: list[DataError] | None
) -> ModalityFallback:
    """The single-modality models fitted on the model's (cached) nominal features; problems already reported by
    the method's own fit are not repeated."""
    found: list[DataError] = []
    pipeline = model.pipeline
    prepared = pipeline.preprocess(train, errors=found)
    fallback = ModalityFallback().fit(f for _, f in pipeline.iter_features(prepared, errors=found))
    _report_new(found, errors)
    return fallback


class _FallbackScores:
    """Scores each calibration sample's features with both single-modality models, as the scoring loop observes
    them: the fallbacks are calibrated on the very features the main model was, with no second read."""

    def __init__(self, fallback: ModalityFallback | None, pipeline: FeaturePipeline | None = None) -> None:
        self.fallback = fallback
        # A profile that zeroes the RGB background of whole samples cannot do so without a cloud: the 2D-only
        # fallback is then calibrated on the RGB as a degraded sample has it (read again, at training time only).
        self.raw_rgb_pipeline = pipeline if pipeline is not None and pipeline.profile.zero_rgb_background else None
        self.scored: dict[str, list[tuple[float, Any]]] = {"2d": [], "3d": []}
        self.failed: list[DataError] = []

    def __call__(self, prediction: Prediction, features: SampleFeatures | None, missing: DataError | None) -> None:
        assert self.fallback is not None
        if features is None:  # degraded: the fallback of its one modality scored it, the other one cannot
            assert missing is not None
            absent = "3d" if prediction.modality == "2d" else "2d"
            self.failed.append(DataError(missing.path, f"{absent}-only fallback calibration: {missing.problem}"))
            self._add(prediction.modality, prediction.pred_score, prediction.anomaly_map, prediction)
            return
        size = prediction.anomaly_map.shape[-1]
        for present in ("2d", "3d"):
            try:
                if present == "2d":
                    image = features.image
                    if self.raw_rgb_pipeline is not None:
                        inputs = rgb_only_input(self.raw_rgb_pipeline, prediction.record)
                        image = self.raw_rgb_pipeline.image_features(inputs.rgb.unsqueeze(0))[0]
                    anomaly_map, score = self.fallback.score_image(image, size)
                else:
                    anomaly_map, score = self.fallback.score_points(features.points, size)
            except (DataError, ArithmeticError, ValueError, RuntimeError) as error:
                problem = error.problem if isinstance(error, DataError) else one_line(error)
                self.failed.append(
                    DataError(prediction.record.rgb_path, f"{present}-only fallback calibration: {problem}")
                )
                continue
            self._add(present, score, anomaly_map.numpy(), prediction)

    def _add(self, present: str, score: float, anomaly_map: Any, prediction: Prediction) -> None:
        if not np.isfinite(score) or not np.isfinite(anomaly_map).all():
            problem = f"{present}-only fallback calibration: non-finite score"
            self.failed.append(DataError(prediction.record.rgb_path, problem))
            return
        self.scored[present].append((score, anomaly_map))


def _calibrate_fallback(
    trained: TrainedModel,
    scores: _FallbackScores,
    *,
    max_fpr: float,
    source: str,
    errors: list[DataError] | None,
) -> None:
    """Thresholds of each single-modality model from its calibration scores; a modality left without is reported
    (its degraded predictions then carry that reason instead of a label)."""
    found = list(scores.failed)
    for present, scored in scores.scored.items():
        if scored:
            trained.fallback_thresholds[present] = calibrate(
                [s for s, _ in scored], [m for _, m in scored], max_fpr, source
            )
        else:
            found.append(DataError(None, f"the {present}-only fallback has no threshold: no calibration sample scored"))
    _report_new(found, errors)


def _report_new(found: Sequence[DataError], errors: list[DataError] | None) -> None:
    """Append problems not reported yet (a file the main model already reported is not repeated)."""
    if errors is None:
        return
    known = {str(e) for e in errors}
    for problem in found:
        if str(problem) not in known:
            known.add(str(problem))
            errors.append(problem)


def fit_fallback(
    trained: TrainedModel,
    train: Sequence[SampleRecord],
    calibration: Sequence[SampleRecord],
    *,
    max_fpr: float,
    source: str,
    errors: list[DataError] | None = None,
) -> None:
    """Fit and calibrate the single-modality fallback models of a model already calibrated (``--add-categories``).

    The calibration pass goes through the scoring loop like every other, and the fallbacks are scored from its
    features; the main model's own calibration is left as it is.
    """
    trained.fallback = _fit_fallback_models(trained.model, train, errors)
    trained.fallback_thresholds = {}
    scores = _FallbackScores(trained.fallback, trained.model.pipeline)
    found: list[DataError] = []
    for _ in score_records(trained.model, calibration, fallback=trained.fallback, errors=found, observe=scores):
        pass
    _report_new(found, errors)
    _calibrate_fallback(trained, scores, max_fpr=max_fpr, source=source, errors=errors)


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
    """Read one model file back into a fitted model; ``overrides`` are inference-time settings (the method
    config's ``inference_keys``, checked: another key raises :class:`~mmiad.methods.hparams.HparamError`) and
    ``cache_dir``.

    Raises:
        ModelFileError: naming the file and the field or tensor at fault, for any file that does not describe a
            usable model (edited config, wrong shapes, non-finite values, another method's tensors).
    """
    path = Path(path)
    tensors, config = load_model_file(path)
    method_name = config.get("method")
    if not isinstance(method_name, str) or method_name not in available_methods():
        raise ModelFileError(
            f"{path}: field 'method' must be one of {', '.join(available_methods())}, got {method_name!r}"
        )
    method = get_method(method_name)
    check_trained_config(path, config, tensors, method)
    settings = {k: v for k, v in overrides.items() if k != "cache_dir"}  # where caches go is no setting
    overrides = {**overrides, **check_overrides(method.config_class, settings, owner=method_name)}
    own = {k: v for k, v in tensors.items() if not k.startswith("fallback.")}
    try:
        model = method.from_state(config, own, **overrides)
        thresholds = Thresholds.from_dict(config["thresholds"]) if "thresholds" in config else None
        facts = ("category", "categories", "few_shot", "data_root", "trained_on", "precision")
        info: dict[str, Any] = {k: config[k] for k in facts if k in config}
        trained = TrainedModel(model, thresholds, info)
        if "fallback" in config:
            check_fallback_widths(path, model, tensors)
            trained.fallback = ModalityFallback.from_state(config["fallback"], tensors)
            trained.fallback_thresholds = {
                m: Thresholds.from_dict(t) for m, t in config["fallback"].get("thresholds", {}).items()
            }
    except ModelFileError as error:
        if str(error).startswith(str(path)):
            raise
        raise ModelFileError(f"{path}: {one_line(error)}") from error
    except KeyError as error:
        raise ModelFileError(f"{path}: field or tensor {error.args[0]!r} is missing") from error
    except (TypeError, ValueError, RuntimeError, IndexError, AttributeError) as error:
        problem = f"{type(error).__name__}: {one_line(error)}"
        raise ModelFileError(f"{path}: does not describe a usable {method_name} model ({problem})") from error
    return trained


def apply_thresholds(prediction: Prediction, thresholds: Thresholds | None) -> Prediction:
    """Fill ``pred_label`` and ``pred_mask`` from thresholds and record which thresholds they were.

    Raises:
        DataError: for a non-finite score or map, which is never labelled (see :func:`check_finite`); callers
            that serve batches filter those first with :func:`finite_only`.
    """
    check_finite(prediction)
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
    strict: bool = False,
    keep_rgb: bool = False,
    progress: bool = False,
    errors: list[DataError] | None = None,
) -> Iterator[Prediction]:
    """The one way a trained model scores records: :func:`~mmiad.engine.scoring.score_records` with the model's
    thresholds and fallback.

    ``test``, ``predict``, ``report`` and the Python API all score through here, so a sample whose point cloud is
    absent, unreadable or empty (or whose RGB is unreadable) is treated the same everywhere: scored from the other
    modality by the fallback and flagged ``degraded`` (with the file and the reason in its note), with the
    fallback's thresholds, unless ``strict``. A sample with neither modality, or any bad sample when the model has
    no fallback, is reported in ``errors`` (or raised) and skipped. Each prediction records the model ``key``, the
    modality it was scored from and the thresholds applied.
    """
    return score_records(
        trained.model,
        records,
        thresholds=trained.thresholds,
        fallback=trained.fallback,
        fallback_thresholds=trained.fallback_thresholds,
        key=key,
        strict=strict,
        keep_rgb=keep_rgb,
        progress=progress,
        errors=errors,
    )
