"""Where tensors are computed (device) and in which arithmetic (precision): one place for both.

Every command takes ``--device auto|cpu|cuda|cuda:N`` and ``--precision fp32|bf16|fp16``, and every method reads
them from its settings. This module turns those strings into a :class:`torch.device` and an autocast context,
so that each method, extractor and benchmark resolves them the same way and a CPU-only machine runs exactly the
code a GPU machine runs (only the device object differs).

Why autocast rather than casting the weights: the stored weights stay float32 (a model trained in bf16 on a GPU
loads and runs anywhere), and autocast keeps the numerically sensitive operations (normalisation, softmax,
reductions, losses) in float32 while matrix products and convolutions take the low-precision path.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch

#: Accepted ``--precision`` values; ``fp32`` is the papers' and the default.
PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_device_name(name: str) -> str:
    """Validate a device string (``auto``, ``cpu``, ``cuda``, ``cuda:N``) without needing the device present.

    A model file records the device it was trained on; loading it elsewhere must not fail, so this only checks
    the spelling. :func:`resolve_device` checks availability.

    Raises:
        ValueError: for any other string.
    """
    text = str(name).strip().lower()
    if text in ("auto", "cpu", "cuda"):
        return text
    if text.startswith("cuda:") and text[5:].isdigit():
        return text
    raise ValueError(f"unknown device {name!r}; expected auto, cpu, cuda or cuda:N")


def resolve_device(name: str | torch.device) -> torch.device:
    """The torch device for a device string: ``auto`` is CUDA when available, else the CPU.

    Raises:
        ValueError: for a CUDA device on a machine without one (or an index beyond the GPUs present), with a
            message that names ``--device cpu`` instead of failing deep inside torch.
    """
    text = str(name) if isinstance(name, torch.device) else check_device_name(name)
    if text == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(text)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {text!r} was asked for but this torch sees no CUDA device; use --device cpu")
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {text!r}: only {torch.cuda.device_count()} CUDA device(s) present")
        return torch.device("cuda", index)
    return device


def device_present(name: str) -> bool:
    """Whether :func:`resolve_device` would accept ``name`` on this machine (False for a misspelt name too)."""
    try:
        resolve_device(name)
    except ValueError:
        return False
    return True


def check_precision(precision: str) -> str:
    """Validate a ``--precision`` value.

    Raises:
        ValueError: for anything but fp32, bf16 or fp16.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    return precision


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a precision (None for fp32: no autocast)."""
    return _DTYPES.get(check_precision(precision))


@contextlib.contextmanager
def autocast(device: torch.device | str, precision: str) -> Iterator[None]:
    """Run the block in ``precision`` on ``device`` (fp32: unchanged).

    fp16 on a CPU is correct but slow (most CPUs have no fast fp16 products), so it warns; bf16 on a CPU uses
    the native bf16 instructions where the CPU has them (AVX-512 BF16, AMX) and is emulated otherwise.
    """
    dtype = autocast_dtype(precision)
    if dtype is None:
        yield
        return
    kind = torch.device(device).type
    if kind == "cpu" and dtype is torch.float16:
        warnings.warn("fp16 on a CPU is emulated and slow; bf16 is the CPU's low precision", stacklevel=3)
    with torch.autocast(device_type=kind, dtype=dtype):
        yield


def available_devices() -> list[str]:
    """The devices this machine can run on: ``cpu`` always, ``cuda`` when torch sees one (tests parametrise on it)."""
    return ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def describe_device(device: torch.device | str) -> str:
    """A human-readable name for reports and run records (the GPU's model name on CUDA)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def synchronize(device: torch.device | str) -> None:
    """Wait for queued device work (timings on CUDA are otherwise meaningless); nothing on a CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
