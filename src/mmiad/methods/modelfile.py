"""Self-describing model files: safetensors weights with the JSON config in the same file's metadata.

One file per trained model keeps deployment simple (copy one file to the line PC) and loading safe: safetensors
holds only raw tensors, and the config is plain JSON, so loading a model never unpickles arbitrary objects.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mmiad import __version__

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
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        save_file(contiguous, temp_name, metadata=metadata)
        os.replace(temp_name, path)
    finally:
        if os.path.exists(temp_name):
            os.unlink(temp_name)
    return path


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
    config = json.loads(metadata[_CONFIG_KEY])
    if config.get("format") != FORMAT_NAME:
        raise ModelFileError(f"{path}: unknown model format {config.get('format')!r}")
    if int(config.get("format_version", 0)) > FORMAT_VERSION:
        raise ModelFileError(
            f"{path}: model format version {config['format_version']} is newer than this mmiad supports "
            f"({FORMAT_VERSION}); upgrade mmiad"
        )
    return config


def load_model_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and config of a model file."""
    config = read_model_config(path)
    with safe_open(str(path), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    return tensors, config


def split_prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under ``prefix.`` with the prefix removed (one model file holds several modules)."""
    start = prefix + "."
    return {name[len(start) :]: tensor for name, tensor in tensors.items() if name.startswith(start)}


def prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Inverse of :func:`split_prefixed`."""
    return {f"{prefix}.{name}": tensor for name, tensor in state.items()}
