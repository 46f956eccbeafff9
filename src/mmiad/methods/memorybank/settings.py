"""The hyperparameters every memory-bank method shares, and the one place a bank is built from them.

BTF and M3DM (and any later PatchCore-style method) differ in what they put into their banks, not in how a bank is
subsampled, searched or kept within memory; their configs inherit these fields so the names, defaults and checks
are the same everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mmiad.methods.hparams import require
from mmiad.methods.memorybank.bank import MemoryBank, spill_folder
from mmiad.methods.memorybank.knn import BACKENDS
from mmiad.methods.settings import MethodSettings
from mmiad.utils.compute import resolve_device


@dataclass
class BankSettings(MethodSettings):
    """Memory-bank hyperparameters, on top of the pipeline settings every method has.

    Attributes:
        coreset_fraction: Share of the nominal patches each bank keeps (0.1).
        coreset_eps: Projection distortion of the coreset selection (0.9).
        seed: Seed of the coreset projections (unseeded, hence nondeterministic, in the official codes).
        reweight_k: Neighbours of m* in the image-score reweighting (3, m* itself included).
        knn_backend: ``auto`` (faiss when installed), ``torch`` or ``faiss``; all give the same neighbours.
        memory_budget_gb: RAM per bank for collected patches before they spill to disk.
    """

    coreset_fraction: float = 0.1
    coreset_eps: float = 0.9
    seed: int = 0
    reweight_k: int = 3
    knn_backend: str = "auto"
    memory_budget_gb: float = 4.0

    def check_bank_settings(self) -> None:
        """Reject values no bank can work with (called by the subclasses' ``__post_init__``)."""
        require(0 < self.coreset_fraction <= 1, "coreset_fraction", self.coreset_fraction, "must be in (0, 1]")
        require(self.coreset_eps > 0, "coreset_eps", self.coreset_eps, "must be positive")
        require(self.reweight_k >= 1, "reweight_k", self.reweight_k, "must be at least 1")
        require(self.memory_budget_gb >= 0, "memory_budget_gb", self.memory_budget_gb, "must be at least 0")
        require(self.knn_backend in BACKENDS, "knn_backend", self.knn_backend, f"expected one of {', '.join(BACKENDS)}")

    def new_bank(self, cache_dir: str | Path | None, seed_offset: int = 0) -> MemoryBank:
        """An empty bank with these settings; patches past the budget spill under ``cache_dir/spill``."""
        spill = spill_folder(cache_dir)
        return MemoryBank(
            fraction=self.coreset_fraction,
            eps=self.coreset_eps,
            seed=self.seed + seed_offset,
            budget_gb=self.memory_budget_gb,
            spill_dir=spill,
            knn_backend=self.knn_backend,
            device=str(resolve_device(self.device)),
        )
