"""The Python API: the CLI's ``train``, ``evaluate`` and ``predict`` as functions with typed results.

Example:
    >>> import mmiad
    >>> run = mmiad.train("data", "run", method="cfm", epochs=60)          # doctest: +SKIP
    >>> metrics = mmiad.evaluate("data", run=run.path)                     # doctest: +SKIP
    >>> metrics.mean.image_auroc                                           # doctest: +SKIP
    >>> for p in mmiad.predict(run.path, "new_parts/", category="puck"):   # doctest: +SKIP
    ...     print(p.record.stem, p.pred_score, p.pred_label, p.degraded)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmiad.data.errors import DataError
from mmiad.methods.base import Prediction
from mmiad.metrics.pro import AuproMode


@dataclass(frozen=True)
class CategoryMetrics:
    """The benchmark metrics of one category (None where undefined, e.g. a single class).

    ``aupro_10`` and ``aupro_5`` come last (and default to None, as in results written before they existed) so
    code that builds the object positionally keeps working.
    """

    image_auroc: float | None
    pixel_auroc: float | None
    aupro_30: float | None
    aupro_1: float | None
    aupro_10: float | None = None
    aupro_5: float | None = None

    @classmethod
    def from_dict(cls, values: dict[str, float | None]) -> CategoryMetrics:
        """From the JSON schema's keys (``image_auroc``, ``pixel_auroc``, ``aupro@0.3``, ``aupro@0.1``, ...)."""
        return cls(
            values["image_auroc"],
            values["pixel_auroc"],
            values["aupro@0.3"],
            values["aupro@0.01"],
            values.get("aupro@0.1"),
            values.get("aupro@0.05"),
        )


@dataclass(frozen=True)
class Metrics:
    """Per-category metrics, their unweighted mean, and the files that were skipped."""

    per_category: dict[str, CategoryMetrics]
    mean: CategoryMetrics
    skipped: list[DataError] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The JSON schema every command writes."""
        return self.raw


@dataclass(frozen=True)
class Run:
    """A trained run folder: one model file per category (or ``unified``)."""

    path: Path
    models: dict[str, Path]
    skipped: list[DataError] = field(default_factory=list)


def _metrics(result: dict[str, Any], skipped: list[DataError]) -> Metrics:
    per = {name: CategoryMetrics.from_dict(values) for name, values in result["per_category"].items()}
    return Metrics(per, CategoryMetrics.from_dict(result["mean"]), skipped, result)


def train(
    data: str | Path,
    out: str | Path,
    *,
    method: str = "cfm",
    categories: Sequence[str] | None = None,
    unified: bool = False,
    shots: int | None = None,
    seed: int = 0,
    max_fpr: float = 0.01,
    cache_dir: str | Path | None = None,
    fallback: bool = True,
    format: str | None = None,
    progress: bool = False,
    **hparams: Any,
) -> Run:
    """``mmiad train``: fit a model per category (or one unified model) and write the run folder.

    Method hyperparameters (``epochs``, ``extractors``, ``grid_size``, ``device``, ``precision``, ...) are keyword
    arguments; ``format`` names the dataset layout (``mvtec3d``, ``eyecandies``; detected by default).
    """
    from mmiad.engine import train_run

    files, skipped = train_run(
        method,
        data,
        out,
        categories=categories,
        unified=unified,
        shots=shots,
        seed=seed,
        max_fpr=max_fpr,
        hparams=hparams,
        cache_dir=str(cache_dir) if cache_dir is not None else None,
        fallback=fallback,
        format=format,
        progress=progress,
    )
    return Run(Path(out), files, skipped)


def evaluate(
    data: str | Path,
    *,
    run: str | Path | None = None,
    maps: str | Path | None = None,
    categories: Sequence[str] | None = None,
    aupro_mode: AuproMode | None = None,
    cache_dir: str | Path | None = None,
    format: str | None = None,
    device: str | None = None,
    progress: bool = False,
) -> Metrics:
    """``mmiad test`` (with ``run``) or ``mmiad evaluate`` (with ``maps``): metrics on the test split.

    ``aupro_mode`` None means: a run's own protocol (the papers' sampled AUPRO for compat runs, see
    :func:`mmiad.metrics.aupro_protocol`), the exact curve for a maps folder. ``device`` is where a run's models
    run (``auto``, ``cpu``, ``cuda``, ``cuda:N``; default: the device they were trained on when present, else auto).
    """
    if (run is None) == (maps is None):
        raise ValueError("give exactly one of run= (a trained run) or maps= (a folder of anomaly maps)")
    if run is not None:
        from mmiad.engine import evaluate_run

        cache = str(cache_dir) if cache_dir is not None else None
        result, skipped = evaluate_run(
            run,
            data,
            categories=categories,
            aupro_mode=aupro_mode,
            cache_dir=cache,
            format=format,
            overrides={"device": device} if device else None,
            progress=progress,
        )
    else:
        from mmiad.metrics import evaluate_maps_dir

        assert maps is not None

        result, skipped = evaluate_maps_dir(
            data, maps, categories=categories, aupro_mode=aupro_mode or "exact", format=format, progress=progress
        )
    return _metrics(result, skipped)


def predict(
    run: str | Path,
    input: str | Path,
    *,
    xyz: str | Path | None = None,
    category: str | None = None,
    format: str | None = None,
    threshold: float | None = None,
    cache_dir: str | Path | None = None,
    device: str | None = None,
    errors: list[DataError] | None = None,
) -> list[Prediction]:
    """``mmiad predict``: score new samples (a folder with rgb/ and xyz/, a flat folder of pairs, one pair, or the
    test split of a dataset root's ``category``).

    Each :class:`~mmiad.methods.base.Prediction` has ``pred_score``, ``anomaly_map`` (model resolution; use
    :func:`mmiad.data.preprocess.map_to_original` for the input resolution), ``pred_label``, ``pred_mask``,
    ``degraded`` (True when one modality was missing and the fallback scored the sample), and what produced it:
    ``model``, ``modality`` and ``thresholds``. ``threshold`` replaces the calibrated image threshold; ``device``
    is where the models run (as :func:`evaluate`).
    """
    from mmiad.engine import RunModels, input_records

    overrides = {"device": device} if device else None
    models = RunModels(
        run, cache_dir=str(cache_dir) if cache_dir else None, image_threshold=threshold, overrides=overrides
    )
    key = models.key_for(category)
    records = input_records(input, xyz=xyz, category=category or key, format=format, errors=errors)
    return list(models.predict(records, category or key, errors=errors))
