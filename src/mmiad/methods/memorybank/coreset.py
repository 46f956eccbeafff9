"""Greedy k-centre coreset (PatchCore), the memory-bank subsampling BTF and M3DM both use.

A memory bank of every training patch is large and slow to search, and most patches are near-duplicates. The
greedy k-centre selection keeps the patches that cover the feature space best: start from patch 0, then repeatedly
add the patch farthest from everything selected so far. As in PatchCore's reference code, distances are computed
on a sparse random projection of the features whose size follows the Johnson–Lindenstrauss bound for ``eps``
(0.9 in both papers), and the projected copy is held in float16 (the official code runs in fp16 on the GPU).

Memory stays bounded: the projection is applied chunk by chunk to features that may live on disk, and every
greedy step updates the running min-distance vector chunk by chunk, so neither an N×N matrix nor an N×D float32
temporary is ever built. What is held is the N×k float16 projection plus one N-vector of float32.

Speed: a greedy step is memory-bound (it reads the whole projected bank once). On a CPU the float32 work buffer
is sized to stay in cache (about 1 M values) and reused in place for the conversion, difference, square and row
sum, so per step only the float16 bank travels from memory, with bit-identical distances (same float32
operations per row). On a CPU the loop runs on one thread (see :mod:`mmiad.utils.threads`). On an accelerator,
blocks are large (16 M values) because there launches, not caches, dominate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from mmiad.utils.threads import single_thread_on_cpu

Chunks = Sequence[torch.Tensor | np.ndarray]

#: Float32 values per greedy-step block: cache-sized on a CPU, large on an accelerator (launch-bound there).
_CPU_BLOCK_VALUES = 1 << 20
_DEVICE_BLOCK_VALUES = 1 << 24


def jl_min_dim(n_samples: int, eps: float) -> int:
    """Smallest dimension that keeps pairwise distances within ``1 ± eps`` (Dasgupta & Gupta's bound).

    ``4 ln(n) / (eps²/2 − eps³/3)``, the formula scikit-learn's ``johnson_lindenstrauss_min_dim`` implements.
    """
    if not 0 < eps < 1:
        raise ValueError(f"eps must be in (0, 1), got {eps}")
    if n_samples < 1:
        raise ValueError(f"need at least one sample, got {n_samples}")
    return int(4 * math.log(n_samples) / (eps**2 / 2 - eps**3 / 3))


def sparse_projection(in_dim: int, out_dim: int, seed: int) -> torch.Tensor:
    """in_dim×out_dim very sparse random projection (Li et al. 2006), scikit-learn's ``density="auto"``.

    Each entry is ``±sqrt(1/density)/sqrt(out_dim)`` with probability ``density/2`` each and 0 otherwise, with
    ``density = 1/sqrt(in_dim)``; the scale keeps squared norms unbiased. Materialised dense: it is small
    (at most a few thousand × a few hundred) and dense matmuls are faster than sparse ones at this size.
    """
    density = 1.0 / math.sqrt(in_dim)
    rng = np.random.default_rng(seed)
    draw = rng.random((in_dim, out_dim))
    signs = np.where(rng.random((in_dim, out_dim)) < 0.5, -1.0, 1.0)
    value = math.sqrt(1.0 / density) / math.sqrt(out_dim)
    return torch.from_numpy(np.where(draw < density, signs * value, 0.0).astype(np.float32))


def chunk_as_float(chunk: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A chunk of rows as a float32 tensor (a memory-mapped array is read from disk here)."""
    if isinstance(chunk, np.ndarray):
        return torch.from_numpy(np.array(chunk, dtype=np.float32))
    return chunk.float()


def project_chunks(
    chunks: Iterable[torch.Tensor | np.ndarray],
    matrix: torch.Tensor | None,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Concatenated float16 projections of the (transformed) chunks, read one at a time."""
    parts = []
    for chunk in chunks:
        rows = chunk_as_float(chunk)
        if transform is not None:
            rows = transform(rows)
        parts.append((rows @ matrix if matrix is not None else rows).half())
    return torch.cat(parts) if parts else torch.empty(0, 0, dtype=torch.float16)


def greedy_coreset(
    features: torch.Tensor | Chunks,
    n_select: int,
    *,
    eps: float = 0.9,
    seed: int = 0,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    chunk_size: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> torch.Tensor:
    """Indices (in selection order) of the greedy k-centre coreset of ``features``.

    Args:
        features: N×D tensor, or a sequence of row chunks (tensors or possibly memory-mapped arrays) that
            together form the N×D matrix; chunks are read once, for the projection.
        n_select: Coreset size; clipped to N.
        eps: Johnson–Lindenstrauss distortion of the projection. When the bound is not below D the features
            are used unprojected (PatchCore's reference code does the same when the projection fails).
        seed: Seed of the projection matrix (the official code leaves it unseeded).
        transform: Applied to each chunk as it is read (e.g. normalisation), so no normalised copy is kept.
        chunk_size: Rows per distance update; defaults to about 1 M projected values per block on a CPU (fits
            the cache) and 16 M on an accelerator. The selection does not depend on it.
        device: Where the greedy loop runs (CPU by default; any torch device, e.g. ``"cuda"``).
        progress: Show a progress bar over the selection steps.
    """
    chunks: Chunks = [features] if isinstance(features, torch.Tensor) else features
    total = sum(int(c.shape[0]) for c in chunks)
    if total == 0:
        raise ValueError("cannot build a coreset of an empty feature set")
    if n_select < 1:
        raise ValueError(f"coreset size must be at least 1, got {n_select}")
    in_dim = int(chunks[0].shape[1])
    out_dim = jl_min_dim(total, eps) if total > 1 else in_dim
    matrix = sparse_projection(in_dim, out_dim, seed) if out_dim < in_dim else None
    projected = project_chunks(chunks, matrix, transform).to(device)
    return _greedy_select(projected, min(n_select, total), chunk_size=chunk_size, progress=progress)


def _greedy_select(
    projected: torch.Tensor, n_select: int, *, chunk_size: int | None = None, progress: bool = False
) -> torch.Tensor:
    """Greedy k-centre selection on the (float16) projected rows, on their device; starts at row 0.

    Every step computes, per row, the float32 sum of squared differences to the last selected row and lowers
    the running minimum; the next selection is the first row with the largest minimum (torch's argmax keeps the
    first of ties). The block buffer is allocated once and every operation runs in place in it.
    """
    total, width = projected.shape
    device = projected.device
    block_values = _CPU_BLOCK_VALUES if device.type == "cpu" else _DEVICE_BLOCK_VALUES
    step = max(1, min(total, chunk_size or block_values // max(width, 1)))
    buffer = torch.empty(step, width, dtype=torch.float32, device=device)
    squared = torch.empty(step, dtype=torch.float32, device=device)
    last = torch.empty(width, dtype=torch.float32, device=device)
    min_dist = torch.full((total,), float("inf"), device=device)
    # The current index stays a device tensor, so an accelerator never waits for the host between steps.
    selected = torch.empty(n_select, dtype=torch.long, device=device)
    current = torch.zeros(1, dtype=torch.long, device=device)
    with single_thread_on_cpu(device):
        for position in tqdm(range(n_select), desc="coreset", disable=not progress, leave=False):
            selected[position : position + 1] = current
            last.copy_(projected.index_select(0, current)[0])
            for start in range(0, total, step):
                rows = min(step, total - start)
                block, block_squared = buffer[:rows], squared[:rows]
                block.copy_(projected[start : start + rows])
                block.sub_(last)
                block.mul_(block)
                torch.sum(block, dim=1, out=block_squared)
                target = min_dist[start : start + rows]
                torch.minimum(target, block_squared, out=target)
            current = torch.argmax(min_dist).view(1)
    return selected.cpu()
