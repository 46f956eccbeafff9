"""Uni-RCM's training grids: in RAM up to a budget, memory-mapped from disk beyond it.

A unified model trains on every category at once, and its 56×56 grids are large: the unified MVTec 3D-AD training
set (~2,650 images, 768 + 1152 channels) is ~64 GB at float32. Re-extracting features every epoch (CFM's way
past its budget) would redo the 3D projection each step, so instead the grids are written once to ``.npy`` files
and read back per batch. Both paths give bit-identical training.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from mmiad.methods.memorybank.bank import PatchStore
from mmiad.methods.unircm.training import Grids


class GridStore(Mapping[int, Grids]):
    """Per-sample (G·G×C2, G·G×C3, G·G foreground) grids keyed by global sample index.

    Args:
        budget_bytes: RAM for the 2D and 3D grids together; the foreground masks always stay in RAM (they are
            tiny). Samples beyond the budget spill to a temporary folder inside ``spill_dir``.
        dtype: Storage dtype of the feature grids (training always computes in float32).
        spill_dir: Parent of the spill folder (the system temporary folder when None).
    """

    def __init__(
        self, budget_bytes: float, dtype: torch.dtype = torch.float32, spill_dir: str | Path | None = None
    ) -> None:
        if budget_bytes < 0:
            raise ValueError(f"the memory budget must be non-negative, got {budget_bytes} bytes")
        self.budget_bytes = budget_bytes
        self.dtype = dtype
        self.spill_dir = spill_dir
        self._positions: dict[int, int] = {}
        self._foreground: list[torch.Tensor] = []
        self._stores: tuple[PatchStore, PatchStore] | None = None

    def add(self, index: int, rows_2d: torch.Tensor, rows_3d: torch.Tensor, foreground: torch.Tensor) -> None:
        """Store one sample's grids under ``index``."""
        if index in self._positions:
            raise ValueError(f"sample {index} is already stored")
        if self._stores is None:
            # Split the budget by channel count so both modalities spill at the same sample.
            share = rows_2d.shape[1] / (rows_2d.shape[1] + rows_3d.shape[1])
            self._stores = (
                PatchStore(self.budget_bytes * share, self.spill_dir, self.dtype),
                PatchStore(self.budget_bytes * (1 - share), self.spill_dir, self.dtype),
            )
        self._stores[0].append(rows_2d)
        self._stores[1].append(rows_3d)
        self._positions[index] = len(self._foreground)
        self._foreground.append(foreground.bool().clone())

    def __getitem__(self, index: int) -> Grids:
        position = self._positions[index]
        assert self._stores is not None
        return self._stores[0].block(position), self._stores[1].block(position), self._foreground[position]

    def __iter__(self) -> Iterator[int]:
        return iter(self._positions)

    def __len__(self) -> int:
        return len(self._positions)

    def __contains__(self, index: object) -> bool:
        return index in self._positions

    def foreground(self, index: int) -> torch.Tensor:
        """The sample's foreground mask, without reading its grids."""
        return self._foreground[self._positions[index]]

    @property
    def spilled(self) -> bool:
        """Whether any grid lives on disk."""
        return self._stores is not None and any(store.spilled for store in self._stores)

    def close(self) -> None:
        """Forget every grid and delete spilled files."""
        if self._stores is not None:
            for store in self._stores:
                store.close()
        self._stores = None
        self._positions.clear()
        self._foreground.clear()
