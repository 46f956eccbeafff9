"""Shared helpers for importing the authors' released checkpoints (``mmiad import``).

Each method's package knows its own official file layout (``methods/<m>/official.py``); what they share is here:
finding the files a release folder holds, checking the names taken from file names, reading files safely
(``torch.load(weights_only=True)``, through :func:`mmiad.features.checkpoints.read_checkpoint`), and checking a
file's tensors against modules built in the official layout, so that a wrong file produces *one* error that names
the file and lists every missing, unexpected or mis-shaped key.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from mmiad.features.checkpoints import (
    CheckpointError,
    check_dense_storage,
    check_finite,
    load_strict,
    read_checkpoint,
    state_problems,
)
from mmiad.utils.hashing import file_sha256

_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
ModuleT = TypeVar("ModuleT", bound=nn.Module)


@dataclass
class OfficialImport:
    """What an importer turned a released file set into: mmiad tensors and hyperparameters for one model.

    Attributes:
        hparams: Method hyperparameters the file set fixes (network sizes, codebook sizes, ...).
        channels: The (2D, 3D) feature channels the networks expect; checked against the extractors.
        tensors: The model's tensors under mmiad's names (what ``from_state`` reads).
        sources: Provenance: one ``{"file", "sha256"}`` entry per file read.
        facts: Anything else worth keeping in the model file (epochs and batch size from the file name, ...).
    """

    hparams: dict[str, Any]
    channels: tuple[int, int]
    tensors: dict[str, torch.Tensor]
    sources: list[dict[str, str]] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)


def plain_name(name: str, path: Path) -> str:
    """A category (or model) name taken from a file name, refused unless it is one plain path component."""
    if not _PLAIN_NAME.match(name) or ".." in name or "/" in name or "\\" in name:
        raise CheckpointError(path, f"{name!r} is not a plain category name (letters, digits, '_', '-', '.')")
    return name


def find_files(source: Path, pattern: re.Pattern[str]) -> list[Path]:
    """Files whose name matches ``pattern``: ``source`` itself, or found anywhere below a folder (sorted)."""
    if source.is_file():
        return [source] if pattern.match(source.name) else []
    if not source.is_dir():
        raise CheckpointError(source, "no such file or folder")
    return sorted(p for p in source.rglob("*") if p.is_file() and pattern.match(p.name))


def files_by_class(source: Path, pattern: re.Pattern[str], none_found: str) -> dict[str, dict[str, Path]]:
    """``{class: {role: path}}`` from the files :func:`find_files` finds, ``pattern``'s group 1 naming the role
    (a network, a direction) and group 2 the class (a plain name); whether each class is complete is the caller's.

    Raises:
        CheckpointError: a second file for the same class and role, a class name that is not plain, or no file
            at all (``none_found`` says what was looked for).
    """
    found: dict[str, dict[str, Path]] = {}
    for path in find_files(source, pattern):
        match = pattern.match(path.name)
        assert match is not None
        role, name = match.group(1), plain_name(match.group(2), path)
        if role in found.setdefault(name, {}):
            raise CheckpointError(path, f"a second {role} file for class {name!r} ({found[name][role]})")
        found[name][role] = path
    if not found:
        raise CheckpointError(source, none_found)
    return found


def read_official(path: Path) -> dict[str, Any]:
    """Read a released file safely; ``argparse.Namespace`` is the one class allowed besides tensors.

    Training scripts built on MAE's ``misc.save_model`` (M3DM's ``fusion_pretrain.py``) store their parsed
    command line under ``args``; a Namespace only holds plain attributes, so allowing it keeps the load safe.
    Every tensor must be dense (:func:`~mmiad.features.checkpoints.check_dense_storage`), so nothing read from
    the file can declare more elements than the file holds bytes; the releases are all torch >= 1.6 zip files,
    so the legacy pickle format is refused.
    """
    with torch.serialization.safe_globals([argparse.Namespace]):
        loaded = read_checkpoint(path, allow_legacy=False)
    _check_names(path, loaded)
    check_dense_storage(path, loaded)
    return loaded


def _check_names(path: Path, obj: Any, where: str = "") -> None:
    """Refuse a mapping keyed by anything but strings (``{0: tensor}`` loads, then breaks every name lookup)."""
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            if not isinstance(key, str):
                raise CheckpointError(path, f"key {key!r}{f' under {where!r}' if where else ''} is not a name")
            _check_names(path, value, f"{where}.{key}" if where else key)
    elif isinstance(obj, list | tuple):
        for index, value in enumerate(obj):
            _check_names(path, value, f"{where}.{index}" if where else str(index))


def source_entry(path: Path) -> dict[str, str]:
    """Provenance of one file (name and SHA-256), stored in the model file."""
    return {"file": path.name, "sha256": file_sha256(path)}


def require_keys(path: Path, state: Mapping[str, Any], keys: Iterable[str], kind: str) -> None:
    """Refuse a file that lacks the keys its shapes are read from: it is another kind of file."""
    missing = [k for k in keys if not isinstance(state.get(k), torch.Tensor)]
    if missing:
        raise CheckpointError(path, f"not a {kind} file", missing=missing)


def tensor_shape(path: Path, state: Mapping[str, Any], key: str, ndim: int) -> tuple[int, ...]:
    """The shape of ``state[key]``, refused unless it has ``ndim`` dimensions (sizes are read from it)."""
    tensor = state.get(key)
    if not isinstance(tensor, torch.Tensor):
        raise CheckpointError(path, f"{key!r} is missing or not a tensor")
    if tensor.dim() != ndim or tensor.numel() == 0:
        raise CheckpointError(path, f"{key!r} has shape {tuple(tensor.shape)}; expected {ndim} non-empty dimensions")
    return tuple(int(size) for size in tensor.shape)


def build_checked(path: Path, build: Callable[[], ModuleT], state: Mapping[str, Any]) -> ModuleT:
    """The module ``build`` makes, filled from ``state`` after every check that needs no allocation.

    Order matters for hostile files: the module is first built on the meta device (no memory) and the file's
    names and shapes are compared with it, so sizes read from a tensor never allocate anything the file does
    not itself hold (its tensors are dense: :func:`read_official`); then the used tensors must be finite; only
    then is the real module built and loaded.

    Raises:
        CheckpointError: naming ``path``: sizes that make no module, every missing, unexpected or mis-shaped key,
            or the first tensor with a NaN or infinite value.
    """
    try:
        with torch.device("meta"):
            skeleton = build()
    except (ValueError, AssertionError, RuntimeError, TypeError, ZeroDivisionError) as error:
        raise CheckpointError(path, f"the sizes its tensors declare make no valid model ({error})") from error
    missing, unexpected, mismatched = state_problems(skeleton, state)
    if missing or unexpected or mismatched:
        raise CheckpointError(
            path,
            f"checkpoint does not fit {type(skeleton).__name__}",
            missing=missing,
            unexpected=unexpected,
            mismatched=mismatched,
        )
    check_finite(path, {k: v for k, v in state.items() if k in skeleton.state_dict()})
    module = build()
    load_strict(module, state, path=path)
    return module


def count_indexed(state: Mapping[str, Any], prefix: str) -> int:
    """How many consecutive ``prefix<i>.`` groups the keys hold (blocks, layers)."""
    count = 0
    while any(key.startswith(f"{prefix}{count}.") for key in state):
        count += 1
    return count
