"""Zero-shot methods (``needs_training`` False, e.g. MuSc-V2): score a batch with no training, and label it
without calibrated thresholds.

A trained method carries thresholds calibrated on nominal data; a zero-shot method has seen no data before the
batch it scores, and its scores are relative to that batch. Samples are labelled by a robust outlier rule over the
batch instead: anomalous when the score exceeds ``median + k · 1.4826 · MAD`` of the batch's scores (k = 3 by
default; 1.4826·MAD estimates the standard deviation of the nominal majority without being pulled up by the
defects). The rule assumes most of the batch is nominal; ``--threshold`` overrides it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmiad.data.errors import DataError
from mmiad.data.sample import SampleRecord
from mmiad.engine.evaluation import evaluate_predictions
from mmiad.engine.runs import Log, quiet
from mmiad.engine.scoring import score_records
from mmiad.methods.base import AnomalyModel, Prediction
from mmiad.methods.registry import available_methods, get_method
from mmiad.metrics.pro import AuproMode
from mmiad.postprocess.threshold import Thresholds

OUTLIER_K = 3.0


def zero_shot_model(
    method: str, hparams: dict[str, Any] | None = None, *, cache_dir: str | None = None
) -> AnomalyModel:
    """A zero-shot method (``needs_training`` False) ready to score a batch.

    Raises:
        ValueError: for an unknown method, a method that needs training (with the commands to train it), or an
            option it does not take.
    """
    from mmiad.engine.trained import build_model

    if get_method(method).needs_training:
        raise ValueError(
            f"method {method!r} needs training: `mmiad train --method {method} --data ROOT --out RUN`, then "
            "`mmiad test --run RUN` / `mmiad predict --run RUN`; zero-shot methods: "
            + (", ".join(zero_shot_methods()) or "none")
        )
    return build_model(method, cache_dir, hparams)


def zero_shot_methods() -> list[str]:
    """The registered methods that need no training (read from their capabilities)."""
    return [name for name in available_methods() if not get_method(name).needs_training]


def training_free_methods() -> list[str]:
    """The registered methods whose ``fit`` only stores the nominal samples (read from their capabilities)."""
    return [name for name in available_methods() if get_method(name).training_free]


def score_zero_shot(
    records: Sequence[SampleRecord],
    hparams: dict[str, Any] | None = None,
    *,
    method: str,
    cache_dir: str | None = None,
    strict: bool = False,
    keep_rgb: bool = False,
    progress: bool = False,
    errors: list[DataError] | None = None,
) -> list[Prediction]:
    """Predictions for one batch scored by a zero-shot method (no run, no training), in input order, unlabelled
    (see :func:`batch_thresholds`). The engine's scoring loop reads and extracts; a ``whole_batch`` method sees
    the whole batch."""
    model = zero_shot_model(method, hparams, cache_dir=cache_dir)
    scored = score_records(
        model, records, label=False, strict=strict, keep_rgb=keep_rgb, progress=progress, errors=errors
    )
    return list(scored)


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
    method: str,
    categories: Sequence[str] | None = None,
    maps_dir: str | Path | None = None,
    aupro_mode: AuproMode | None = None,
    num_thresholds: int | None = None,
    cache_dir: str | None = None,
    format: str | None = None,
    strict: bool = False,
    progress: bool = False,
    log: Log = quiet,
) -> tuple[dict[str, Any], list[DataError]]:
    """Metrics per category, each category's test split scored as one batch (the paper's protocol)."""
    from mmiad.data.formats import open_dataset
    from mmiad.engine.evaluation import write_test_map
    from mmiad.metrics import summarize

    dataset = open_dataset(data_root, format)
    names = list(categories) if categories else dataset.categories()
    errors: list[DataError] = []
    per_category: dict[str, dict[str, float]] = {}
    for category in names:
        records = dataset.records(category, "test", errors=errors)
        predictions = score_zero_shot(
            records, hparams, method=method, cache_dir=cache_dir, strict=strict, progress=progress, errors=errors
        )
        if maps_dir is not None:  # the same confined, atomic writer as ``mmiad test --run --maps``
            for prediction in predictions:
                write_test_map(maps_dir, category, prediction)
        per_category[category] = evaluate_predictions(
            predictions, aupro_mode=aupro_mode or "exact", num_thresholds=num_thresholds or 99
        )
        log(f"[{category}] {len(predictions)} test samples scored zero-shot ({method})")
    return summarize(per_category), errors


def evaluate_training_free(
    data_root: str | Path,
    hparams: dict[str, Any] | None = None,
    *,
    method: str,
    categories: Sequence[str] | None = None,
    cache_dir: str | None = None,
    format: str | None = None,
    progress: bool = False,
    log: Log = quiet,
    **evaluation: Any,
) -> tuple[dict[str, Any], list[DataError]]:
    """``mmiad test --method M --data D`` for a training-free method (``training_free``, e.g. RAD).

    Nothing is optimised, but the method's memory is the training split, so it is built (``mmiad train``'s
    path: the same selection, thresholds and fallback) in a temporary run folder that is removed afterwards, and
    that run is tested as ``mmiad test --run`` would. ``evaluation`` takes :func:`evaluate_run`'s other options.
    """
    import tempfile

    from mmiad.engine.evaluation import evaluate_run
    from mmiad.engine.runs import train_run

    prototype = get_method(method)
    if not prototype.training_free:
        raise ValueError(f"method {method!r} is not training-free; train it with `mmiad train --method {method}`")
    with tempfile.TemporaryDirectory(prefix=f"mmiad-{method}-") as folder:
        run = Path(folder) / "run"
        _, errors = train_run(
            method,
            data_root,
            run,
            categories=categories,
            unified=prototype.unified,
            hparams=hparams,
            cache_dir=cache_dir,
            format=format,
            progress=progress,
            log=log,
        )
        log(f"{method}: memory built from the training split (no optimisation); testing it")
        result, more = evaluate_run(
            run, data_root, categories=categories, cache_dir=cache_dir, format=format, progress=progress, log=log,
            **evaluation,
        )  # fmt: skip
    return result, [*errors, *more]
