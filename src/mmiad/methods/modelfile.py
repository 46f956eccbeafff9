"""Self-describing model files: safetensors weights with the JSON config in the same file's metadata.

One file per trained model keeps deployment simple (copy one file to the line PC) and loading safe: safetensors
holds only raw tensors, and the config is plain JSON, so loading a model never unpickles arbitrary objects.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mmiad import __version__
from mmiad.methods.hparams import value_fits
from mmiad.utils.atomic import write_with

FORMAT_NAME = "mmiad-model"
FORMAT_VERSION = 1
_CONFIG_KEY = "mmiad_config"


class ModelFileError(ValueError):
    """A model file is missing, corrupt, of another format, or does not fit the data/extractors it is used with."""


def save_model_file(path: str | Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    """Write tensors and config atomically (a killed save never leaves a half-written model behind)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "mmiad_version": __version__, **config}
    metadata = {_CONFIG_KEY: json.dumps(header, sort_keys=True)}
    contiguous = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    return write_with(path, lambda temp: save_file(contiguous, str(temp), metadata=metadata))


def read_model_config(path: str | Path) -> dict[str, Any]:
    """The JSON config of a model file, without reading the tensors."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as error:
        raise ModelFileError(f"{path}: not a readable safetensors model file ({error})") from error
    if _CONFIG_KEY not in metadata:
        raise ModelFileError(f"{path}: safetensors file without an mmiad config; was it written by mmiad?")
    try:
        config = json.loads(metadata[_CONFIG_KEY])
    except json.JSONDecodeError as error:
        raise ModelFileError(f"{path}: field {_CONFIG_KEY!r} is not valid JSON ({error})") from error
    if not isinstance(config, dict):
        raise ModelFileError(f"{path}: field {_CONFIG_KEY!r} must be a JSON object, got {type(config).__name__}")
    if config.get("format") != FORMAT_NAME:
        raise ModelFileError(f"{path}: unknown model format {config.get('format')!r}")
    version = config.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise ModelFileError(f"{path}: field 'format_version' must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path}: model format version {config['format_version']} is newer than this mmiad supports "
            f"({FORMAT_VERSION}); upgrade mmiad"
        )
    return config


def load_model_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and config of a model file; every tensor is checked (see :func:`check_tensors`)."""
    config = read_model_config(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except Exception as error:  # safetensors raises several types for truncated or edited data
        raise ModelFileError(f"{path}: unreadable tensors ({type(error).__name__}: {one_line(error)})") from error
    check_tensors(path, tensors)
    return tensors, config


def check_tensors(path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    """Every tensor is real-valued and finite: a NaN weight or bank row would turn every score into NaN.

    Raises:
        ModelFileError: naming the file and the tensor.
    """
    for name, tensor in tensors.items():
        if tensor.is_complex():
            raise ModelFileError(f"{path}: tensor {name!r} has unsupported dtype {tensor.dtype}")
        if tensor.is_floating_point():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise ModelFileError(f"{path}: tensor {name!r} holds {bad} non-finite value(s)")


def one_line(error: BaseException) -> str:
    """An exception's message on one line (PyTorch's state-dict errors span several)."""
    return "; ".join(part.strip() for part in str(error).splitlines() if part.strip()) or type(error).__name__


def check_config_fields(path: str | Path, values: Any, config_class: type, field: str) -> None:
    """``values`` (a JSON object from a model file) fits the dataclass ``config_class`` field by field.

    An edited model file with ``grid_size: "32"`` otherwise fails deep inside training code with a TypeError that
    names neither the file nor the field. The type rules are :func:`mmiad.methods.hparams.value_fits`' (the one
    check every hyperparameter goes through), strict: a file is JSON, so ``"false"`` is not a boolean here.

    Raises:
        ModelFileError: naming the file and the field (``hparams.grid_size``).
    """
    if not isinstance(values, dict):
        raise ModelFileError(f"{path}: field {field!r} must be a JSON object, got {type(values).__name__}")
    hints = typing.get_type_hints(config_class)
    known = {f.name for f in dataclasses.fields(config_class)}
    for key, value in values.items():
        if key not in known:
            raise ModelFileError(f"{path}: field '{field}.{key}' is not a setting of {config_class.__name__}")
        if not value_fits(value, hints[key]):
            expected = getattr(hints[key], "__name__", str(hints[key]))
            raise ModelFileError(f"{path}: field '{field}.{key}' must be {expected}, got {value!r}")


def split_prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under ``prefix.`` with the prefix removed (one model file holds several modules)."""
    start = prefix + "."
    return {name[len(start) :]: tensor for name, tensor in tensors.items() if name.startswith(start)}


def prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Inverse of :func:`split_prefixed`."""
    return {f"{prefix}.{name}": tensor for name, tensor in state.items()}
