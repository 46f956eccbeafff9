"""GLFM's Stage II and III: class prototypes, one local memory per prototype, and routed 1-NN scoring.

* A cloud's global feature is the mean of its local (per-group) features.
* The global memory holds K prototypes: real training clouds picked by the greedy k-centre coreset over the global
  features (random projection, start at cloud 0; :func:`~mmiad.methods.memorybank.coreset.greedy_coreset`), not
  k-means centres as the paper says. With K ≥ the number of clouds every cloud is a prototype.
* Each training cloud goes, whole, to its nearest prototype (Euclidean, ties to the first) and all its local
  features join that prototype's local memory, which is then cut to 10 % by the same greedy coreset.
* A test cloud is routed the same way; each of its local features scores its plain 1-NN Euclidean distance to the
  routed memory (no reweighting, no k > 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from mmiad.methods.memorybank.bank import gather_rows
from mmiad.methods.memorybank.coreset import chunk_as_float, greedy_coreset
from mmiad.methods.memorybank.knn import NearestNeighbors


def global_feature(local: torch.Tensor) -> torch.Tensor:
    """(C,) mean of a cloud's (G,C) local features, in float32."""
    return local.float().mean(dim=0)


def select_prototypes(
    globals_: torch.Tensor, count: int, *, eps: float, seed: int, device: torch.device
) -> torch.Tensor:
    """Indices of the K prototype clouds: greedy k-centre from cloud 0, or every cloud when K ≥ their number."""
    if globals_.shape[0] <= count:
        return torch.arange(globals_.shape[0])
    return greedy_coreset(globals_.float(), count, eps=eps, seed=seed, device=device)


def route(globals_: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """(S,) index of each cloud's nearest prototype by Euclidean distance (the first one on ties)."""
    distances = torch.cdist(globals_.float()[None], prototypes.float()[None])[0]
    return torch.argmin(distances, dim=1)


def more_prototypes(existing: torch.Tensor, candidates: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of ``count`` further prototypes among ``candidates``, farthest-first from those already held.

    GLFM has no incremental mode; this continues its greedy k-centre selection over the new clouds, with the
    existing prototypes counted as already selected (exact distances: the candidates are a few clouds).
    """
    count = min(count, candidates.shape[0])
    nearest = torch.cdist(candidates.double()[None], existing.double()[None])[0].min(dim=1).values
    chosen: list[int] = []
    for _ in range(count):
        pick = int(torch.argmax(nearest))
        chosen.append(pick)
        distance = torch.linalg.vector_norm(candidates.double() - candidates[pick].double(), dim=1)
        nearest = torch.minimum(nearest, distance)
        nearest[pick] = -1.0
    return torch.tensor(chosen, dtype=torch.long)


Chunk = torch.Tensor | np.ndarray  # one cloud's local features, in RAM or memory-mapped from a spill file


def coreset_bank(
    chunks: Sequence[Chunk], fraction: float, *, eps: float, seed: int, device: torch.device
) -> torch.Tensor:
    """One local memory: ``int(fraction · rows)`` rows (at least 1) of the chunks by greedy coreset, in float32.

    The chunks (one cloud's local features each, float16 or float32, in RAM or spilled to disk by
    :class:`~mmiad.methods.memorybank.bank.PatchStore`) are projected one at a time; only the kept rows are
    gathered back, so the float32 copy of the whole bank is never built.
    """
    rows = sum(int(c.shape[0]) for c in chunks)
    if rows == 0:
        raise ValueError("a local memory received no feature")
    keep = max(1, int(fraction * rows))
    if keep >= rows:
        return torch.cat([chunk_as_float(c) for c in chunks])
    selected = greedy_coreset(list(chunks), keep, eps=eps, seed=seed, device=device)
    return gather_rows(chunks, selected, lambda chunk, rows: chunk_as_float(chunk[rows]))


def centre_scores(local: torch.Tensor, bank: NearestNeighbors) -> torch.Tensor:
    """(G,) 1-NN Euclidean distance of each local feature to the routed memory."""
    distances, _ = bank.search(local.float(), 1)
    return distances[:, 0]
