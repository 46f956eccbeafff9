"""Every output file is written through a temporary file in the same folder and renamed into place.

A killed ``train``, ``predict`` or ``report`` then leaves either the previous file or the new one, never half of
one: ``os.replace`` is atomic within a file system, and the data is flushed to disk (``fsync``) before the rename.
Temporary files are named ``.<target name>.<random>.tmp<suffix>``: hidden (so listings and the cache report skip
them, see :func:`is_temp_name`), with the target's suffix (so Pillow and tifffile pick the right format). One left
behind by a killed writer is removed by the next write of the same target once it is :data:`STALE_AFTER_S` old (a
younger one may belong to a writer still running). Files get ``0o666`` minus the umask, as ``open()`` would give
them, not ``mkstemp``'s ``0o600``.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TEMP_MARK = ".tmp"
STALE_AFTER_S = 3600.0


def is_temp_name(name: str) -> bool:
    """Whether a file name is one of this module's temporary files (or any hidden file): never a real entry."""
    return name.startswith(".")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def remove_stale_temps(path: Path, older_than_s: float = STALE_AFTER_S) -> list[Path]:
    """Delete the temporary files of ``path`` left by killed writers; returns what was removed."""
    removed = []
    cutoff = time.time() - older_than_s
    for temp in path.parent.glob(f".{path.name}.*{TEMP_MARK}{path.suffix}"):
        try:
            if temp.stat().st_mtime < cutoff:
                temp.unlink()
                removed.append(temp)
        except OSError:
            continue  # another process removed or replaced it
    return removed


def _fsync_dir(folder: Path) -> None:
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not supported everywhere (Windows); the rename itself is still atomic
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is flushed, given normal permissions and renamed.

    For writers that take a file name (safetensors, tifffile, Pillow). On any exception the temporary file is
    removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    temp = path.parent / f".{path.name}.{secrets.token_hex(4)}{TEMP_MARK}{path.suffix}"
    try:
        yield temp
        with temp.open("rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(temp, 0o666 & ~_umask())
        os.replace(temp, path)
        _fsync_dir(path.parent)
    finally:
        temp.unlink(missing_ok=True)


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as temp:
        temp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, data: Any, *, indent: int | None = 2, allow_nan: bool = True) -> Path:
    """Write ``data`` as JSON atomically (``allow_nan=False`` for strict JSON)."""
    return write_text(path, json.dumps(data, indent=indent, allow_nan=allow_nan))


def write_with(path: str | Path, writer: Callable[[Path], object]) -> Path:
    """Write through ``writer(temp_path)`` atomically (e.g. ``lambda p: image.save(p)``)."""
    with atomic_path(path) as temp:
        writer(temp)
    return Path(path)
