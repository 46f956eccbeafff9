"""Scoring records with a trained run: which model serves a category, what a user's input is, one entry point.

``mmiad predict``, ``mmiad test``, ``mmiad report``, ``mmiad demo`` and :func:`mmiad.predict` all load models
through :class:`RunModels` and score through :func:`~mmiad.engine.trained.predict_records`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmiad.data.errors import DataError
from mmiad.data.folder import list_folder_records
from mmiad.data.formats import detect_format, get_format, open_dataset
from mmiad.data.sample import SampleRecord
from mmiad.engine.runs import run_models, serving_key
from mmiad.engine.trained import TrainedModel, load_trained, predict_records
from mmiad.methods.base import Prediction
from mmiad.postprocess.threshold import Thresholds


class RunModels:
    """The models of a run folder, loaded on first use and shared between the categories they serve.

    Args:
        run: Run folder written by ``mmiad train``.
        cache_dir: Cache folder for the models' pipelines.
        overrides: Inference-time hyperparameters replacing the stored ones (e.g. ``{"aggregation": "sum"}``).
        image_threshold: Replaces every model's calibrated image threshold (``--threshold``).
    """

    def __init__(
        self,
        run: str | Path,
        *,
        cache_dir: str | None = None,
        overrides: dict[str, Any] | None = None,
        image_threshold: float | None = None,
    ) -> None:
        self.run = Path(run)
        self.paths = run_models(run)
        self.cache_dir = cache_dir
        self.overrides = dict(overrides or {})
        self.image_threshold = image_threshold
        self._loaded: dict[Path, TrainedModel] = {}

    def key_for(self, category: str | None) -> str:
        """The model key serving ``category``: its own, the unified one, or the only one when ``category`` is None.

        Raises:
            ValueError: when ``category`` is None and the run has several models.
            ModelFileError: when no model serves ``category``.
        """
        if category is None:
            if len(self.paths) != 1:
                raise ValueError(f"the run has several models ({', '.join(sorted(self.paths))}); choose a category")
            return next(iter(self.paths))
        return serving_key(self.paths, category)

    def trained(self, key: str) -> TrainedModel:
        """The loaded model of ``key`` (see :meth:`key_for`), thresholds overridden as configured."""
        path = self.paths[key]
        if path not in self._loaded:
            trained = load_trained(path, cache_dir=self.cache_dir, **self.overrides)
            if self.image_threshold is not None:
                trained.thresholds = override_image_threshold(trained.thresholds, self.image_threshold)
                trained.fallback_thresholds = {
                    m: override_image_threshold(t, self.image_threshold) for m, t in trained.fallback_thresholds.items()
                }
            self._loaded[path] = trained
        return self._loaded[path]

    def predict(
        self,
        records: list[SampleRecord],
        category: str | None = None,
        *,
        strict: bool = False,
        keep_rgb: bool = False,
        progress: bool = False,
        errors: list[DataError] | None = None,
    ) -> Iterator[Prediction]:
        """Score records with the model serving ``category`` (see :func:`predict_records`; ``strict`` makes a
        sample missing a modality an error instead of a degraded prediction)."""
        key = self.key_for(category)
        trained = self.trained(key)
        return predict_records(
            trained, records, key=key, strict=strict, keep_rgb=keep_rgb, progress=progress, errors=errors
        )


def override_image_threshold(thresholds: Thresholds | None, image_threshold: float) -> Thresholds:
    """Calibrated thresholds with the image threshold replaced by the user's (``--threshold``)."""
    if thresholds is None:
        return Thresholds(image_threshold, image_threshold, float("nan"), "user")
    return dataclasses.replace(thresholds, image=image_threshold, source="user")


def input_records(
    input: str | Path,
    *,
    xyz: str | Path | None = None,
    category: str = "custom",
    format: str | None = None,
    split: str = "test",
    require_both: bool = False,
    errors: list[DataError] | None = None,
) -> list[SampleRecord]:
    """The records a user points ``predict`` at.

    In a plain folder an RGB image without the cloud of its stem is a record whose cloud is absent (scored from
    the RGB alone, degraded) unless ``require_both``, which reports it instead.

    * an RGB file with ``xyz``: that one pair;
    * a dataset root of a registered format (MVTec 3D-AD, Eyecandies, or ``format`` given): ``category``'s
      ``split`` (``test`` by default; Eyecandies' unlabelled ``test_private`` is ``predict``);
    * any other folder: the plain folder layout (``rgb/`` + ``xyz/``, or ``NAME.png`` + ``NAME.tiff``), whose
      samples are attached to ``category``.

    Raises:
        DataError: when the input does not exist or holds no sample.
    """
    if xyz is not None:
        return list_folder_records(input, xyz_path=xyz, category=category, errors=errors)
    path = Path(input)
    if not path.is_dir():
        raise DataError(path, "input folder not found" if not path.exists() else "a single file needs --xyz CLOUD")
    dataset_format = get_format(format) if format not in (None, "auto") else detect_format(path)
    if dataset_format.name == "folder":
        return list_folder_records(path, category=category, require_both=require_both, errors=errors)
    records = open_dataset(path, dataset_format.name).records(category, split, errors=errors)
    if not records:
        raise DataError(path, f"no {split} sample of category {category!r} in this {dataset_format.name} dataset")
    return records
