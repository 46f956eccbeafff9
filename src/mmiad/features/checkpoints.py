"""Reading released checkpoint files safely and loading them strictly into our own modules.

The official backbones ship in several wrappings (a plain DINO state dict, a timm safetensors file, a Point-MAE
training checkpoint with ``base_model``/``module.`` nesting). The helpers here turn any of them into one flat
``name -> tensor`` dict without ever unpickling arbitrary objects (``torch.load(weights_only=True)``), and load it
*strictly*: a silently half-loaded backbone produces plausible-looking but wrong features, which is the worst
failure mode for a benchmark, so every missing, unexpected or mis-shaped key is reported by name.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmiad.data.errors import DataError

#: Keys that wrap the real state dict in training checkpoints (DINO full checkpoints use ``teacher``).
WRAPPER_KEYS: tuple[str, ...] = ("model", "state_dict", "teacher")

_MAX_LISTED = 25


class CheckpointError(DataError):
    """A checkpoint that cannot be read, or whose tensors do not fit the model.

    Attributes:
        missing: Model keys the checkpoint lacks.
        unexpected: Checkpoint keys the model does not have.
        mismatched: ``"key: checkpoint shape vs model shape"`` lines.
    """

    def __init__(
        self,
        path: str | Path | None,
        problem: str,
        *,
        missing: Iterable[str] = (),
        unexpected: Iterable[str] = (),
        mismatched: Iterable[str] = (),
    ) -> None:
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        self.mismatched = sorted(mismatched)
        details = [problem]
        for label, keys in (
            ("missing keys", self.missing),
            ("unexpected keys", self.unexpected),
            ("shape mismatches", self.mismatched),
        ):
            if keys:
                shown = ", ".join(keys[:_MAX_LISTED])
                more = f" … and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else ""
                details.append(f"{label} ({len(keys)}): {shown}{more}")
        super().__init__(path, "; ".join(details))


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a ``.safetensors``, ``.pth``/``.pt``/``.bin`` file into a dict, refusing pickled Python objects.

    Raises:
        CheckpointError: If the file is missing, unreadable, or contains more than tensors and plain containers.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "checkpoint file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path), device="cpu"))
        except Exception as error:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(path, f"unreadable safetensors file ({error})") from error
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            path,
            "refusing to unpickle Python objects (weights_only=True); re-save the file with only tensors, "
            f"e.g. torch.save(state_dict, path) ({error})",
        ) from error
    except (RuntimeError, EOFError, OSError) as error:
        raise CheckpointError(path, f"unreadable or truncated checkpoint ({error})") from error
    if not isinstance(loaded, Mapping):
        raise CheckpointError(path, f"expected a dict of tensors, got {type(loaded).__name__}")
    return dict(loaded)


def unwrap_state_dict(obj: Mapping[str, Any], wrapper_keys: Iterable[str] = WRAPPER_KEYS) -> dict[str, Any]:
    """Descend through ``{'model': {...}}``-style wrappers until the dict holds tensors."""
    current: Mapping[str, Any] = obj
    keys = tuple(wrapper_keys)
    while True:
        inner = next((current[k] for k in keys if isinstance(current.get(k), Mapping)), None)
        if inner is None:
            return dict(current)
        current = inner


def strip_prefixes(state: Mapping[str, Any], prefixes: Iterable[str]) -> dict[str, Any]:
    """Remove each prefix, in order, from the start of every key that has it (DDP ``module.``, DINO ``backbone.``)."""
    ordered = tuple(prefixes)
    result: dict[str, Any] = {}
    for key, value in state.items():
        name = key
        for prefix in ordered:
            if name.startswith(prefix):
                name = name[len(prefix) :]
        result[name] = value
    return result


def load_strict(
    module: nn.Module,
    state: Mapping[str, Any],
    *,
    path: str | Path | None = None,
    ignore_unexpected: Callable[[str], bool] = lambda key: False,
    ignore_missing: Callable[[str], bool] = lambda key: False,
) -> None:
    """Copy ``state`` into ``module``, raising one error that lists every key problem at once.

    Args:
        module: The model to fill.
        state: Flat ``name -> tensor`` dict, already unwrapped and renamed.
        path: The file the state came from, for the error message.
        ignore_unexpected: True for checkpoint keys that are known and deliberately unused (heads, decoders,
            blocks removed by layer pruning).
        ignore_missing: True for model keys that may legitimately be absent (BatchNorm's ``num_batches_tracked``).

    Raises:
        CheckpointError: With the missing, unexpected and mis-shaped keys.
    """
    expected = module.state_dict()
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    not_tensors = [k for k in state if k not in tensors and not ignore_unexpected(k)]
    missing = [k for k in expected if k not in tensors and not ignore_missing(k)]
    unexpected = [k for k in tensors if k not in expected and not ignore_unexpected(k)] + not_tensors
    mismatched = [
        f"{k}: {tuple(tensors[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in tensors and tensors[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        raise CheckpointError(
            path,
            f"checkpoint does not fit {type(module).__name__}",
            missing=missing,
            unexpected=unexpected,
            mismatched=mismatched,
        )
    module.load_state_dict({k: v for k, v in tensors.items() if k in expected}, strict=False)
