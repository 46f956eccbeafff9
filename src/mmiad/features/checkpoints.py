"""Reading released checkpoint files safely and loading them strictly into our own modules.

The official backbones ship in several wrappings (a plain DINO state dict, a timm safetensors file, a Point-MAE
training checkpoint with ``base_model``/``module.`` nesting). The helpers here turn any of them into one flat
``name -> tensor`` dict without ever unpickling arbitrary objects (``torch.load(weights_only=True)``), and load it
*strictly*: a silently half-loaded backbone produces plausible-looking but wrong features, which is the worst
failure mode for a benchmark, so every missing, unexpected or mis-shaped key is reported by name.
"""

from __future__ import annotations

import itertools
import pickle
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
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


#: The first bytes of a ``torch.save`` file: a zip archive (torch >= 1.6) or a pickle (the legacy format).
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_MAGIC = b"\x80"


def _not_a_checkpoint(head: bytes) -> str:
    """What a file that is no ``torch.save`` output looks like, for the error message."""
    if not head:
        return "an empty file, not a PyTorch checkpoint"
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in text[:512]:
        return "an HTML page, not a PyTorch checkpoint (a download that returned a web page?)"
    if text.startswith((b"version https://git-lfs", b"oid sha256:")):
        return "a Git LFS pointer, not a PyTorch checkpoint (fetch the real file with git lfs pull)"
    try:
        decoded = head.decode("utf-8")
    except UnicodeDecodeError:
        decoded = "\x00"
    if any(ord(c) < 32 and c not in "\t\r\n" for c in decoded):
        return "not a PyTorch checkpoint (neither a zip archive nor a pickle)"
    return "a text file, not a PyTorch checkpoint"


def _check_archive(path: Path, head: bytes, *, allow_legacy: bool) -> None:
    """Refuse what ``torch.load`` must never see: text or HTML posing as a checkpoint, compressed archive entries
    (``torch.save`` stores them uncompressed; a deflated entry is how a 200 KB file inflates to 200 MB) and, when
    ``allow_legacy`` is False, the pre-1.6 pickle format, whose storages are allocated at their declared size
    before any byte is read."""
    if head.startswith(_ZIP_MAGIC):
        try:
            with zipfile.ZipFile(path) as archive:
                packed = [info.filename for info in archive.infolist() if info.compress_type != zipfile.ZIP_STORED]
        except (zipfile.BadZipFile, OSError, ValueError) as error:
            raise CheckpointError(path, f"unreadable or truncated checkpoint ({error})") from error
        if packed:
            raise CheckpointError(
                path, f"compressed entries ({packed[0]}): torch.save never compresses; refusing a possible zip bomb"
            )
        return
    if head.startswith(_PICKLE_MAGIC):
        if not allow_legacy:
            raise CheckpointError(path, "a legacy (pre-1.6) torch.save file; re-save it with a current PyTorch")
        return
    raise CheckpointError(path, _not_a_checkpoint(head))


def read_checkpoint(path: str | Path, *, allow_legacy: bool = True) -> dict[str, Any]:
    """Read a ``.safetensors``, ``.pth``/``.pt``/``.bin`` file into a dict, refusing pickled Python objects.

    Args:
        path: The file.
        allow_legacy: Also read the pre-1.6 pickle format (see :func:`_check_archive`).

    Raises:
        CheckpointError: If the file is missing, unreadable, text or HTML, compressed, or contains more than tensors
            and plain containers.
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
        with path.open("rb") as handle:
            head = handle.read(1024)
    except OSError as error:
        raise CheckpointError(path, f"unreadable ({error.strerror or error})") from error
    _check_archive(path, head, allow_legacy=allow_legacy)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = _refusal_line(error)
        if reason is None:
            raise CheckpointError(path, f"unreadable or corrupt checkpoint ({_first_line(error)})") from error
        raise CheckpointError(
            path,
            "refusing to unpickle Python objects (weights_only=True); re-save the file with only tensors, "
            f"e.g. torch.save(state_dict, path) ({reason})",
        ) from error
    except Exception as error:  # a damaged archive or pickle surfaces as any of KeyError, IndexError, RuntimeError…
        raise CheckpointError(path, f"unreadable or truncated checkpoint ({type(error).__name__}: {error})") from error
    if not isinstance(loaded, Mapping):
        raise CheckpointError(path, f"expected a dict of tensors, got {type(loaded).__name__}")
    return dict(loaded)


def _first_line(error: BaseException) -> str:
    """The first line of an error's message (torch's weights-only errors run to a dozen lines)."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _refusal_line(error: BaseException) -> str | None:
    """The line of a weights-only error that names the refused Python object, or None when the pickle is corrupt
    rather than refused (torch raises the same error type for both)."""
    for line in str(error).splitlines():
        if "unsupported" in line.lower() or "blocked" in line.lower():
            return line.strip()
    return None


def iter_tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor inside nested dicts, lists and tuples, with a dotted name (``model.input.weight``)."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            yield from iter_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, list | tuple):
        for index, value in enumerate(obj):
            yield from iter_tensors(value, f"{prefix}.{index}" if prefix else str(index))


def _self_overlaps(tensor: torch.Tensor) -> bool:
    """True when two elements of a strided tensor share bytes (dims of size 1 do not count).

    Sorted by stride, each dimension must step over everything the smaller ones span; that is the whole test
    for non-negative strides (torch never loads negative ones).
    """
    reach = 0  # the largest offset the smaller dimensions reach
    for stride, size in sorted((s, n) for s, n in zip(tensor.stride(), tensor.shape, strict=True) if n > 1):
        if stride <= reach:
            return True
        reach += (size - 1) * stride
    return False


def check_dense_storage(path: str | Path, loaded: Any) -> None:
    """Refuse a file whose tensors are not plain arrays backed by their own bytes: stride-0 (expanded) or otherwise
    self-overlapping views, and tensors overlapping another one's bytes.

    ``torch.save`` of a parameter never produces those, but a crafted file can: a 14 KB file can declare a
    stride-0 tensor of 10⁹ elements that passes ``torch.load`` and costs gigabytes the moment anything copies it or
    sizes a module from it. Refusing them means every element a tensor declares is backed by its own bytes in the
    file (whose archive entries are stored uncompressed: :func:`read_checkpoint`), so what an import allocates is
    bounded by the file's size. A permuted, non-overlapping view stays allowed: the official Uni-RCM files hold
    their position encodings that way. Only metadata is read here.

    Raises:
        CheckpointError: naming the file and the first such tensor.
    """
    spans: dict[int, list[tuple[int, int, str]]] = {}
    for name, tensor in iter_tensors(loaded):
        if tensor.layout != torch.strided or tensor.is_quantized:
            raise CheckpointError(path, f"tensor {name!r} is not a dense array ({tensor.layout})")
        if tensor.numel() == 0:
            continue
        if any(stride == 0 and size > 1 for stride, size in zip(tensor.stride(), tensor.shape, strict=True)):
            raise CheckpointError(
                path,
                f"tensor {name!r} is stride-0 (expanded) storage: it declares {tensor.numel()} elements backed by "
                f"{tensor.untyped_storage().nbytes()} bytes; refusing a possible memory bomb",
            )
        if _self_overlaps(tensor):
            raise CheckpointError(path, f"tensor {name!r} has self-overlapping strides {tensor.stride()}")
        itemsize = int(tensor.element_size())
        start = int(tensor.storage_offset()) * itemsize
        reach = sum((int(n) - 1) * int(s) for n, s in zip(tensor.shape, tensor.stride(), strict=True))
        end = start + (reach + 1) * itemsize
        if end > tensor.untyped_storage().nbytes():
            raise CheckpointError(path, f"tensor {name!r} reaches past its storage")
        spans.setdefault(tensor.untyped_storage().data_ptr(), []).append((start, end, name))
    for ranges in spans.values():
        ranges.sort()
        for (_, end, first), (start, _, second) in itertools.pairwise(ranges):
            if start < end:
                raise CheckpointError(path, f"tensors {first!r} and {second!r} overlap in the same storage")


def check_finite(path: str | Path, state: Mapping[str, Any], *, what: str = "tensor") -> None:
    """Refuse NaN or infinite values in any floating-point tensor of ``state``, naming the file and the tensor.

    A NaN weight imports fine and then makes every later command refuse the run (or score NaN): the error
    belongs to the file, at import.
    """
    for name, tensor in iter_tensors(state):
        if tensor.is_floating_point() and tensor.numel() and not bool(torch.isfinite(tensor).all()):
            count = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(path, f"{what} {name!r} has {count} NaN or infinite value(s)")


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


def state_problems(
    module: nn.Module,
    state: Mapping[str, Any],
    *,
    ignore_unexpected: Callable[[str], bool] = lambda key: False,
    ignore_missing: Callable[[str], bool] = lambda key: False,
) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, mis-shaped) keys of ``state`` against ``module``; reads shapes only, so ``module``
    may live on the meta device (see :func:`load_strict` for the arguments)."""
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
    return missing, unexpected, mismatched


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
    missing, unexpected, mismatched = state_problems(
        module, state, ignore_unexpected=ignore_unexpected, ignore_missing=ignore_missing
    )
    if missing or unexpected or mismatched:
        raise CheckpointError(
            path,
            f"checkpoint does not fit {type(module).__name__}",
            missing=missing,
            unexpected=unexpected,
            mismatched=mismatched,
        )
    expected = module.state_dict()
    module.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
