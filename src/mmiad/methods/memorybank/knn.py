"""Exact k-nearest-neighbour search of patch features in a memory bank, with bounded temporary memory.

faiss's flat L2 index is used when it is importable (it is several times faster on CPU); otherwise a chunked
torch search runs. Both return the same neighbours. Distances are recomputed exactly from the chosen neighbours
(‖q − b‖ on the difference, not the ‖q‖² − 2q·b + ‖b‖² expansion both searches rank with), so the two backends
give the same numbers, and a query that is itself in the bank gets exactly zero rather than float noise.

On a GPU (``device``) the torch search runs there, on a copy of the bank kept on the device, and the results come
back on the CPU; faiss here is the CPU build, so ``auto`` picks torch on a GPU. On the CPU nothing moves.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

BACKENDS = ("auto", "torch", "faiss")


def faiss_available() -> bool:
    """True when ``import faiss`` would work."""
    return importlib.util.find_spec("faiss") is not None


def _torch_search(queries: torch.Tensor, bank: torch.Tensor, k: int, chunk_size: int) -> torch.Tensor:
    """Q×k bank indices of the nearest rows, closest first; at most chunk_size×chunk_size distances at once."""
    bank_norms = (bank * bank).sum(dim=1)
    result = []
    for q_start in range(0, queries.shape[0], chunk_size):
        block = queries[q_start : q_start + chunk_size]
        block_norms = (block * block).sum(dim=1, keepdim=True)
        best_dist: torch.Tensor | None = None
        best_idx: torch.Tensor | None = None
        for b_start in range(0, bank.shape[0], chunk_size):
            part = bank[b_start : b_start + chunk_size]
            squared = (block_norms - 2.0 * block @ part.T + bank_norms[b_start : b_start + chunk_size]).clamp_min_(0)
            kk = min(k, part.shape[0])
            dist, idx = torch.topk(squared, kk, dim=1, largest=False, sorted=True)
            idx = idx + b_start
            if best_dist is None or best_idx is None:
                best_dist, best_idx = dist, idx
            else:
                merged_dist = torch.cat([best_dist, dist], dim=1)
                merged_idx = torch.cat([best_idx, idx], dim=1)
                keep = min(k, merged_dist.shape[1])
                best_dist, order = torch.topk(merged_dist, keep, dim=1, largest=False, sorted=True)
                best_idx = torch.gather(merged_idx, 1, order)
        assert best_idx is not None
        result.append(best_idx)
    return torch.cat(result)


class NearestNeighbors:
    """Exact Euclidean kNN over a fixed bank.

    Args:
        bank: M×D float32 bank.
        backend: ``auto`` (faiss when importable), ``torch`` or ``faiss``.
        chunk_size: Rows per block in the torch search (bounds temporaries to chunk_size² floats).
        device: Where the torch search runs (a resolved torch device or its name); the results are on the CPU.
    """

    def __init__(
        self, bank: torch.Tensor, *, backend: str = "auto", chunk_size: int = 4096, device: str | torch.device = "cpu"
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown kNN backend {backend!r}; expected one of {BACKENDS}")
        if bank.ndim != 2 or bank.shape[0] == 0:
            raise ValueError(f"the bank must be a non-empty M×D matrix, got shape {tuple(bank.shape)}")
        if backend == "faiss" and not faiss_available():
            raise ValueError("kNN backend 'faiss' requested but faiss is not installed (pip install faiss-cpu)")
        self.bank = bank.float().contiguous()
        self.device = torch.device(device)
        auto_faiss = backend == "auto" and self.device.type == "cpu" and faiss_available()
        self.backend = "faiss" if backend == "faiss" or auto_faiss else "torch"
        self.chunk_size = chunk_size
        # The bank where the search runs (the same tensor on the CPU); self.bank stays on the CPU for callers.
        self._device_bank = self.bank if self.backend == "faiss" else self.bank.to(self.device)
        self._index: Any = None

    def _faiss_index(self) -> Any:
        if self._index is None:
            import faiss

            index = faiss.IndexFlatL2(self.bank.shape[1])
            index.add(self.bank.numpy())
            self._index = index
        return self._index

    def search(self, queries: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q×k Euclidean distances, Q×k bank indices), nearest first; k is clipped to the bank size."""
        queries = queries.float().contiguous()
        if queries.ndim != 2 or queries.shape[1] != self.bank.shape[1]:
            raise ValueError(f"queries of shape {tuple(queries.shape)} do not match the bank's {self.bank.shape[1]}")
        k = min(k, self.bank.shape[0])
        if queries.shape[0] == 0:
            return torch.empty(0, k), torch.empty(0, k, dtype=torch.long)
        if self.backend == "faiss":
            _, found = self._faiss_index().search(queries.cpu().numpy(), k)
            index = torch.from_numpy(found).long()
            bank = self.bank
        else:
            bank = self._device_bank
            queries = queries.to(bank.device)
            index = _torch_search(queries, bank, k, self.chunk_size)
        queries, index = queries.to(bank.device), index.to(bank.device)
        distance = torch.linalg.vector_norm(queries.unsqueeze(1) - bank[index], dim=2)
        # Re-sort on the exact distances so near-ties are ordered the same by both backends.
        distance, order = torch.sort(distance, dim=1, stable=True)
        return distance.cpu(), torch.gather(index, 1, order).cpu()
