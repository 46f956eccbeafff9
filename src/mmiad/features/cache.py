"""A content-addressed on-disk cache of frozen features.

The official CFM code re-extracts frozen features every epoch; since the extractors never change, extracting once
per (input file contents, preprocessing profile, extractor configuration) and reusing the result across epochs,
methods and runs is a free speed-up. Keys hash the *contents* of the input files and the full extractor config
(including the weights' hash), so a changed configuration or a re-exported file never reuses stale features.
Entries are written to a temporary file and renamed, so a killed extraction leaves no corrupt entry.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mmiad.utils.atomic import is_temp_name, write_with
from mmiad.utils.hashing import file_sha256, json_sha256


@dataclass(frozen=True)
class CacheReport:
    """What the cache holds: number of entries and bytes on disk."""

    root: Path
    entries: int
    bytes: int

    def __str__(self) -> str:
        return f"{self.root}: {self.entries} entries, {self.bytes / 2**20:.1f} MiB"


class FeatureCache:
    """Feature tensors stored as ``<root>/<key[:2]>/<key>.safetensors``.

    Args:
        root: Cache folder (created on first write).
        enabled: When False, ``get`` always misses and ``put`` does nothing (``--no-cache``).
    """

    def __init__(self, root: str | Path, enabled: bool = True) -> None:
        self.root = Path(root)
        self.enabled = enabled
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(input_files: Sequence[str | Path], config: dict[str, Any]) -> str:
        """Content-addressed key: the input files' digests plus the configuration."""
        parts = {"files": [file_sha256(p) for p in input_files], "config": json_sha256(config)}
        return json_sha256(parts)

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def get(
        self, key: str, validate: Callable[[dict[str, torch.Tensor]], str | None] | None = None
    ) -> dict[str, torch.Tensor] | None:
        """The stored tensors, or None on a miss.

        An unreadable entry, or one that ``validate`` finds a problem with (a missing key, a wrong shape,
        non-finite features: a cache on a shared disk may hold anything), counts as a miss and is removed, so the
        caller rebuilds it.
        """
        if not self.enabled:
            return None
        path = self._path(key)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            tensors = load_file(str(path))
            problem = validate(tensors) if validate is not None else None
        except (SafetensorError, OSError, ValueError):
            problem = "unreadable"
        if problem is not None:
            path.unlink(missing_ok=True)
            self.misses += 1
            return None
        self.hits += 1
        return tensors

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        """Store tensors atomically under ``key``."""
        if not self.enabled:
            return
        contiguous = {k: v.contiguous() for k, v in tensors.items()}
        write_with(self._path(key), lambda temp: save_file(contiguous, str(temp)))

    def report(self) -> CacheReport:
        """Number of entries and their total size."""
        found = self.root.glob("*/*.safetensors") if self.root.is_dir() else []
        files = [f for f in found if not is_temp_name(f.name)]  # a killed writer's temporary file is no entry
        return CacheReport(self.root, len(files), sum(f.stat().st_size for f in files))

    def clear(self) -> CacheReport:
        """Delete every entry; returns what was removed."""
        report = self.report()
        if self.root.is_dir():
            shutil.rmtree(self.root)
        return report
