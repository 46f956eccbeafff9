"""A PatchCore memory bank built incrementally: collect patches, normalise, subsample, search, score.

Training patches arrive one image at a time. They are kept in RAM up to a budget and spilled to ``.npy`` files
beyond it, so a category with ten times the usual training set still builds: after the coreset only the selected
rows (``fraction`` of them) stay in memory. Scalar statistics (mean and standard deviation over every element,
as M3DM normalises) are accumulated on the fly in float64, so they need no second pass.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from mmiad.methods.memorybank.coreset import greedy_coreset
from mmiad.methods.memorybank.knn import NearestNeighbors


def spill_folder(cache_dir: str | Path | None) -> Path | None:
    """Where rows past a memory budget spill: ``cache_dir/spill`` (created), or None for the system's temporary
    folder when there is no cache."""
    if not cache_dir:
        return None
    folder = Path(cache_dir) / "spill"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def gather_rows(
    chunks: Sequence[torch.Tensor | np.ndarray],
    indices: torch.Tensor,
    read: Callable[[torch.Tensor | np.ndarray, np.ndarray], torch.Tensor],
) -> torch.Tensor:
    """Float32 rows at ``indices`` of the chunks' concatenation, in that order, each chunk read once
    (``read(chunk, local rows)``: a memory-mapped chunk is read from disk only for the rows asked for)."""
    result = torch.empty(len(indices), int(chunks[0].shape[1]))
    order = torch.argsort(indices)
    sorted_idx = indices[order]
    start = 0
    for chunk in chunks:
        stop = start + int(chunk.shape[0])
        lo, hi = torch.searchsorted(sorted_idx, start), torch.searchsorted(sorted_idx, stop)
        if hi > lo:
            local = (sorted_idx[lo:hi] - start).numpy()
            result[order[lo:hi]] = read(chunk, local).float()
        start = stop
    return result


class PatchStore:
    """Rows appended in blocks; in RAM up to ``budget_bytes``, then as ``.npy`` files under ``spill_dir``.

    Blocks keep ``dtype`` (float32 by default; float16/bfloat16 halve RAM and disk). Spilled blocks are
    memory-mapped, so reading one back costs a disk read, not a copy of the whole store.
    """

    def __init__(
        self, budget_bytes: float, spill_dir: str | Path | None = None, dtype: torch.dtype = torch.float32
    ) -> None:
        self.budget_bytes = budget_bytes
        self.spill_dir = spill_dir
        self.dtype = dtype
        self.chunks: list[torch.Tensor | np.ndarray] = []
        self.rows = 0
        self.in_memory_bytes = 0
        self._folder: Path | None = None

    def append(self, rows: torch.Tensor) -> None:
        """Store an N×D block (converted to the store's dtype)."""
        rows = rows.detach().to(self.dtype).contiguous()
        size = rows.numel() * rows.element_size()
        if self.in_memory_bytes + size <= self.budget_bytes:
            self.chunks.append(rows.clone())
            self.in_memory_bytes += size
        else:
            if self._folder is None:
                self._folder = Path(tempfile.mkdtemp(prefix="mmiad-bank-", dir=self.spill_dir))
            path = self._folder / f"{len(self.chunks):06d}.npy"
            # numpy has no bfloat16: spill its bits as int16 and reinterpret them when read back.
            np.save(path, (rows.view(torch.int16) if self.dtype == torch.bfloat16 else rows).numpy())
            self.chunks.append(np.load(path, mmap_mode="r"))
        self.rows += int(rows.shape[0])

    @property
    def spilled(self) -> bool:
        """Whether any block lives on disk."""
        return self._folder is not None

    def block(self, position: int) -> torch.Tensor:
        """The ``position``-th appended block, in the store's dtype (read from disk when spilled)."""
        return self._read(self.chunks[position], slice(None))

    def _read(self, chunk: torch.Tensor | np.ndarray, rows: slice | np.ndarray) -> torch.Tensor:
        if isinstance(chunk, torch.Tensor):
            return chunk[rows]
        loaded = torch.from_numpy(np.array(chunk[rows]))
        return loaded.view(torch.bfloat16) if self.dtype == torch.bfloat16 else loaded

    def gather(self, indices: torch.Tensor) -> torch.Tensor:
        """Rows at global ``indices``, in that order, reading each chunk once."""
        return gather_rows(self.chunks, indices, self._read)

    def close(self) -> None:
        """Drop every row and delete spilled files."""
        self.chunks.clear()
        self.rows = self.in_memory_bytes = 0
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None


def reweighted_score(
    queries: torch.Tensor,
    min_dist: torch.Tensor,
    nn_index: torch.Tensor,
    search: NearestNeighbors,
    k: int = 3,
    scale: float = 1.0,
) -> float:
    """PatchCore's image score: the largest patch distance s*, damped when its nearest bank point m* is isolated.

    ``w = 1 − exp(s*/√D) / Σ_j exp(‖m_test − n_j‖/√D)`` over the ``k`` nearest bank points of m* with m* itself
    dropped (k−1 terms), and the score is ``w·s*``, as in the official BTF and M3DM code. With a one-row bank
    there is no neighbour to compare with and s* is returned unchanged. ``scale`` divides s* and the neighbour
    distances before all of this (the official M3DM two-bank variant divides them by 1000, which moves w).
    """
    if min_dist.numel() == 0:
        raise ValueError("no patch to score")
    worst = int(torch.argmax(min_dist))
    s_star = float(min_dist[worst]) / scale
    m_test = queries[worst : worst + 1].float()
    m_star = search.bank[int(nn_index[worst]) : int(nn_index[worst]) + 1]
    _, neighbours = search.search(m_star, k)
    neighbours = neighbours[0, 1:]
    if neighbours.numel() == 0:
        return s_star
    root_dim = math.sqrt(queries.shape[1])
    distances = torch.linalg.vector_norm(m_test - search.bank[neighbours], dim=1).double() / scale
    weight = 1.0 - math.exp(s_star / root_dim) / float(torch.exp(distances / root_dim).sum())
    return weight * s_star


class MemoryBank:
    """Nominal patch features of one kind (RGB, point, fused), subsampled by a greedy coreset.

    Args:
        fraction: Coreset size as a fraction of the collected rows (1 keeps them all).
        eps: Projection distortion of the coreset.
        seed: Projection seed.
        budget_gb: RAM for collected rows before they spill to disk.
        spill_dir: Where spilled rows go (a temporary folder inside it, deleted after :meth:`finalize`).
        knn_backend: ``auto``, ``torch`` or ``faiss``.
        device: Where the coreset selection and the kNN search run (the bank itself is kept on the CPU).
    """

    def __init__(
        self,
        *,
        fraction: float = 0.1,
        eps: float = 0.9,
        seed: int = 0,
        budget_gb: float = 4.0,
        spill_dir: str | Path | None = None,
        knn_backend: str = "auto",
        device: str = "cpu",
    ) -> None:
        if not 0 < fraction <= 1:
            raise ValueError(f"coreset fraction must be in (0, 1], got {fraction}")
        self.fraction, self.eps, self.seed, self.device = fraction, eps, seed, device
        self.knn_backend = knn_backend
        self.store = PatchStore(budget_gb * 2**30, spill_dir)
        self.sum = 0.0
        self.sum_sq = 0.0
        self.count = 0
        self.collected = 0
        self.bank: torch.Tensor | None = None
        self.mean, self.std = 0.0, 1.0
        self._search: NearestNeighbors | None = None

    def add(self, rows: torch.Tensor, *, uncounted_zero_rows: int = 0) -> None:
        """Collect N×D rows; ``uncounted_zero_rows`` all-zero rows enter the statistics without being stored.

        The point bank stores only foreground patches (background rows are zero and all alike), but M3DM's
        statistics cover every patch, so the background still counts there.
        """
        if rows.ndim != 2:
            raise ValueError(f"expected an N×D block of patch features, got shape {tuple(rows.shape)}")
        values = rows.detach().double()
        self.sum += float(values.sum())
        self.sum_sq += float((values * values).sum())
        self.count += values.numel() + uncounted_zero_rows * rows.shape[1]
        if rows.shape[0]:
            self.store.append(rows)
        self.collected += int(rows.shape[0])

    def statistics(self) -> tuple[float, float]:
        """(mean, unbiased std) over every collected element, zero rows included (``torch.mean``/``torch.std``)."""
        if self.count < 2:
            raise ValueError("need at least two collected values for statistics")
        mean = self.sum / self.count
        variance = max(self.sum_sq - self.sum * mean, 0.0) / (self.count - 1)
        return mean, math.sqrt(variance)

    def finalize(
        self, *, mean: float = 0.0, std: float = 1.0, n_select: int | None = None, progress: bool = False
    ) -> None:
        """Normalise with (mean, std), keep the coreset (``n_select`` rows, else ``fraction``), free the rest."""
        if self.store.rows == 0:
            raise ValueError("the memory bank is empty: no training patch was collected")
        if std <= 0 or not math.isfinite(std):
            std = 1.0
        self.mean, self.std = float(mean), float(std)
        target = n_select if n_select is not None else max(1, int(self.fraction * self.store.rows))
        if self.fraction >= 1 and n_select is None:
            chosen = torch.arange(self.store.rows)
        else:
            chosen = greedy_coreset(
                self.store.chunks,
                target,
                eps=self.eps,
                seed=self.seed,
                transform=self._normalise,
                device=self.device,
                progress=progress,
            )
        self.bank = self._normalise(self.store.gather(chosen)).contiguous()
        self.store.close()
        self._search = None

    def _normalise(self, rows: torch.Tensor) -> torch.Tensor:
        return (rows - self.mean) / self.std

    def load(self, bank: torch.Tensor, mean: float, std: float) -> None:
        """Restore a finalised bank (model files)."""
        self.bank, self.mean, self.std = bank.float().contiguous(), float(mean), float(std)
        self._search = None

    @property
    def search(self) -> NearestNeighbors:
        """The kNN index over the finalised bank."""
        if self.bank is None:
            raise ValueError("the memory bank is not finalised")
        if self._search is None:
            self._search = NearestNeighbors(self.bank, backend=self.knn_backend, device=self.device)
        return self._search

    def score(
        self, patches: torch.Tensor, *, reweight_k: int = 3, score_scale: float = 1.0
    ) -> tuple[torch.Tensor, float]:
        """(per-patch nearest distance, reweighted image score) of raw (unnormalised) N×D test patches.

        ``score_scale`` divides the distances entering the image score only (see :func:`reweighted_score`).
        """
        queries = (patches.float() - self.mean) / self.std
        distance, index = self.search.search(queries, 1)
        min_dist = distance[:, 0]
        return min_dist, reweighted_score(queries, min_dist, index[:, 0], self.search, reweight_k, score_scale)

    def __len__(self) -> int:
        return 0 if self.bank is None else int(self.bank.shape[0])
