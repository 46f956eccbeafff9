"""Checks of a model file's config before a model is rebuilt from it: edited or damaged files fail with one line.

A model file is copied between machines and may be edited by hand. Everything the loaders read is checked here
first (field types, the thresholds, the fallback settings, tensor shapes), so a bad file is a
:class:`~mmiad.methods.modelfile.ModelFileError` that names the file and the field, never a traceback from deep
inside a method (or, worse, a model that loads and then labels every sample good).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from mmiad.methods.base import AnomalyModel
from mmiad.methods.modelfile import ModelFileError, check_config_fields
from mmiad.postprocess.threshold import Thresholds
from mmiad.utils.names import UnsafeNameError, plain_name

# Tensors that are memory banks (one row per stored patch): they must be non-empty matrices.
_BANK_PREFIXES = ("bank.", "fallback.")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _thresholds(path: Path, data: Any, field: str) -> None:
    try:
        Thresholds.from_dict(data)
    except ValueError as error:
        raise ModelFileError(f"{path}: field {field!r}: {error}") from error


def check_trained_config(
    path: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor], method: type[AnomalyModel]
) -> None:
    """Everything :func:`mmiad.engine.load_trained` reads from ``config`` and ``tensors`` has the right form.

    Raises:
        ModelFileError: naming ``path`` and the first bad field.
    """
    if "hparams" not in config:
        raise ModelFileError(f"{path}: field 'hparams' is missing")
    check_config_fields(path, config["hparams"], method.config_class, "hparams")
    channels = config.get("channels")
    if channels is not None and not (
        isinstance(channels, list)
        and len(channels) == 2
        and all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in channels)
    ):
        raise ModelFileError(f"{path}: field 'channels' must be two positive integers, got {channels!r}")
    if "thresholds" in config:
        _thresholds(path, config["thresholds"], "thresholds")
    try:
        if "category" in config:
            plain_name(config["category"], source=path)
        for category in config.get("categories") or []:
            plain_name(category, source=path)
    except UnsafeNameError as error:
        raise ModelFileError(str(error)) from error
    if "fallback" in config:
        _check_fallback(path, config["fallback"], tensors)
    for name, tensor in tensors.items():
        if name.startswith(_BANK_PREFIXES) and (tensor.ndim != 2 or tensor.shape[0] == 0 or tensor.shape[1] == 0):
            raise ModelFileError(f"{path}: tensor {name!r} must be a non-empty matrix, got shape {tuple(tensor.shape)}")


def _check_fallback(path: Path, fallback: Any, tensors: dict[str, torch.Tensor]) -> None:
    if not isinstance(fallback, dict):
        raise ModelFileError(f"{path}: field 'fallback' must be a JSON object")
    grid: Any = fallback.get("grid")
    fraction: Any = fallback.get("fraction")
    seed: Any = fallback.get("seed")
    if not (isinstance(grid, int) and not isinstance(grid, bool) and grid > 0):
        raise ModelFileError(f"{path}: field 'fallback.grid' must be a positive integer, got {grid!r}")
    if not (_is_number(fraction) and 0 < fraction <= 1):
        raise ModelFileError(f"{path}: field 'fallback.fraction' must be in (0, 1], got {fraction!r}")
    if not (isinstance(seed, int) and not isinstance(seed, bool)):
        raise ModelFileError(f"{path}: field 'fallback.seed' must be an integer, got {seed!r}")
    if not isinstance(fallback.get("smoothing"), str):
        raise ModelFileError(f"{path}: field 'fallback.smoothing' must be a string")
    stats = fallback.get("stats")
    for modality in ("2d", "3d"):
        pair = stats.get(modality) if isinstance(stats, dict) else None
        if not (isinstance(pair, list) and len(pair) == 2 and all(_is_number(v) for v in pair) and pair[1] > 0):
            raise ModelFileError(f"{path}: field 'fallback.stats.{modality}' must be [mean, std > 0], got {pair!r}")
        if f"fallback.{modality}" not in tensors:
            raise ModelFileError(f"{path}: tensor 'fallback.{modality}' is missing")
    thresholds = fallback.get("thresholds", {})
    if not isinstance(thresholds, dict):
        raise ModelFileError(f"{path}: field 'fallback.thresholds' must be a JSON object")
    for modality, data in thresholds.items():
        _thresholds(path, data, f"fallback.thresholds.{modality}")


def check_fallback_widths(path: Path, model: AnomalyModel, tensors: dict[str, torch.Tensor]) -> None:
    """The fallback banks are as wide as the features the configured extractors produce."""
    pipeline = model.pipeline
    expected = {"2d": pipeline.image_extractor.out_channels, "3d": pipeline.point_extractor.out_channels}
    for modality, width in expected.items():
        tensor = tensors.get(f"fallback.{modality}")
        if tensor is not None and int(tensor.shape[1]) != int(width):
            raise ModelFileError(
                f"{path}: tensor 'fallback.{modality}' has {tensor.shape[1]} columns, the extractor gives {width}"
            )
