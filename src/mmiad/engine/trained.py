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
from mmiad.engine.checks import check_fallback_widths, check_trained_config
from mmiad.methods.base import AnomalyModel, Prediction, check_finite, finite_only, with_source
from mmiad.methods.fallback import ModalityFallback, modality_problems, predict_degraded
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
    held_out = list(finite_only(model.predict(calibration, progress=progress, errors=errors), errors))
    if not held_out:
        raise ValueError("no usable held-out nominal sample to calibrate thresholds on")
    thresholds = calibrate([p.pred_score for p in held_out], [p.anomaly_map for p in held_out], max_fpr, source)
    trained = TrainedModel(model, thresholds)
    if with_fallback and getattr(model, "pipeline", None) is not None:
        fit_fallback(trained, train, calibration, max_fpr=max_fpr, source=source, errors=errors)
    return trained


def fit_fallback(
    trained: TrainedModel,
    train: Sequence[SampleRecord],
    calibration: Sequence[SampleRecord],
    *,
    max_fpr: float,
    source: str,
    errors: list[DataError] | None = None,
) -> None:
    """Fit and calibrate the single-modality fallback models on the model's (cached) nominal features.

    A calibration sample the fallback cannot score is reported in ``errors`` (once: a file the main model already
    reported is not repeated), and so is a modality left without thresholds, whose degraded predictions will then
    carry that reason instead of a label.
    """
    found: list[DataError] = []
    pipeline = trained.model.pipeline
    prepared = pipeline.preprocess(train, errors=found)
    trained.fallback = ModalityFallback().fit(f for _, f in pipeline.iter_features(prepared, errors=found))
    for missing, present in (("3d", "2d"), ("2d", "3d")):
        degraded = []
        for record in calibration:
            try:
                prediction = predict_degraded(pipeline, trained.fallback, record, missing)
                check_finite(prediction)
            except DataError as error:
                found.append(DataError(error.path, f"{present}-only fallback calibration: {error.problem}"))
                continue
            degraded.append(prediction)
        if degraded:
            trained.fallback_thresholds[present] = calibrate(
                [p.pred_score for p in degraded], [p.anomaly_map for p in degraded], max_fpr, source
            )
        else:
            found.append(DataError(None, f"the {present}-only fallback has no threshold: no calibration sample scored"))
    if errors is not None:
        known = {str(e) for e in errors}
        for problem in found:
            if str(problem) not in known:
                known.add(str(problem))
                errors.append(problem)


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
            problems = modality_problems(record) if trained.fallback is not None else {}
            if not problems:
                for prediction in finite_only(trained.model.predict([record], errors=found), found):
                    prediction.model = key
                    yield apply_thresholds(with_source(prediction, record), trained.thresholds)
                continue
            assert trained.fallback is not None
            missing, why = next(iter(problems.items()))
            prediction = predict_degraded(trained.model.pipeline, trained.fallback, record, missing)
            prediction = with_source(prediction, record)
            prediction.model = key
            check_finite(prediction)
            thresholds = trained.fallback_thresholds.get(prediction.modality)
            prediction.note = f"degraded: scored from {prediction.modality} only ({why.problem})"
            if thresholds is None:
                prediction.note += f"; not labelled: the model has no {prediction.modality}-only threshold"
            yield apply_thresholds(prediction, thresholds)
        except DataError as error:
            if errors is None:
                raise
            errors.append(error)
        except ModelFileError:
            raise
        except (ArithmeticError, ValueError, RuntimeError, IndexError, MemoryError) as error:
            # A stage failing on one sample's data (an overflow, a degenerate cloud) costs that sample only.
            problem = DataError(record.rgb_path, f"could not be scored ({type(error).__name__}: {one_line(error)})")
            if errors is None:
                raise problem from error
            errors.append(problem)
