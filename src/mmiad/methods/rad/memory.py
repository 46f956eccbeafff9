"""RAD's memory: every training image's CLS token and its patch tokens at each level, kept compactly.

The official code keeps every patch of every training image at four blocks in float32 and moves all of it to the
GPU (9.63 MB per image: 35 GB for MVTec AD). Here the tokens are kept as they come (normalised after the gather, as
the official code) in ``float16`` by default: 4 × 784 × 768 × 2 B = 4.8 MB per image
for DINO ViT-B/8's 28×28 grid. While the memory is built, images past ``memory_budget_gb`` go to memory-mapped
files (the :class:`~mmiad.methods.memorybank.bank.PatchStore` the PatchCore banks use), and a test image only
reads the ``k_image`` images it retrieved. The CLS matrix (N×C, float32) stays in RAM: it is what is searched.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mmiad.methods.memorybank.bank import PatchStore
from mmiad.methods.rad.retrieval import normalised

#: A level's tokens: a store while the memory is built, one (N, P, C) tensor once loaded from a model file.
Level = PatchStore | torch.Tensor

DTYPES = {"float16": torch.float16, "float32": torch.float32}


class RadMemory:
    """CLS tokens, per-level patch tokens and (for the 3D extension) 3D tokens with their foreground.

    Args:
        grid: (h, w) of the token grid; P = h·w.
        dtype: ``float16`` or ``float32``: how tokens are stored (the CLS matrix is always float32).
        budget_bytes: RAM the stored tokens may take before they spill to disk, split evenly over the stores.
        spill_dir: Where spilled tokens go (None: the system's temporary folder).
    """

    def __init__(
        self,
        grid: tuple[int, int],
        dtype: str = "float16",
        budget_bytes: float = 4 * 2**30,
        spill_dir: Path | None = None,
    ) -> None:
        self.grid = grid
        self.dtype = DTYPES[dtype]
        self.budget_bytes = budget_bytes
        self.spill_dir = spill_dir
        self.cls_rows: list[torch.Tensor] = []
        self.cls = torch.zeros(0)
        self.levels: list[Level] = []
        self.points: Level | None = None
        self.foreground_rows: list[torch.Tensor] = []
        self.foreground = torch.zeros(0, dtype=torch.bool)
        self.widths: list[int] = []
        self.point_width = 0
        self._sums: list[torch.Tensor] = []  # float64 per-channel sums: levels, then the 3D foreground rows
        self._counts: list[int] = []
        self.means: list[torch.Tensor] = []  # per-channel means over the stored patches (levels, then 3D)

    @property
    def positions(self) -> int:
        """P, the patches per image."""
        return self.grid[0] * self.grid[1]

    def __len__(self) -> int:
        return int(self.cls.shape[0]) if self.cls.numel() else len(self.cls_rows)

    def _store(self, stores: int) -> PatchStore:
        return PatchStore(self.budget_bytes / max(1, stores), self.spill_dir, self.dtype)

    def add(
        self,
        cls: torch.Tensor,
        levels: list[torch.Tensor],
        points: torch.Tensor | None = None,
        foreground: torch.Tensor | None = None,
    ) -> None:
        """Store one image: (C,) CLS, per level a (P, C) token matrix, optionally (P, C3) 3D tokens and (P,) mask."""
        if not self.levels:
            stores = len(levels) + (points is not None)
            self.levels = [self._store(stores) for _ in levels]
            self.widths = [int(t.shape[1]) for t in levels]
            if points is not None:
                self.points = self._store(stores)
                self.point_width = int(points.shape[1])
        if len(levels) != len(self.levels) or (points is None) != (self.points is None):
            raise ValueError("every image must bring the same levels and modalities")
        self.cls_rows.append(normalised(cls.reshape(-1).float()).cpu())
        rows = list(levels)
        for store, tokens in zip(self.levels, levels, strict=True):
            assert isinstance(store, PatchStore)
            store.append(tokens.reshape(1, -1).cpu())
        if points is not None and foreground is not None:
            assert isinstance(self.points, PatchStore)
            mask = foreground.reshape(-1).bool().cpu()
            self.points.append(points.reshape(1, -1).cpu())
            self.foreground_rows.append(mask)
            rows.append(points.cpu()[mask])
        if not self._sums:
            self._sums = [torch.zeros(int(t.shape[1]), dtype=torch.float64) for t in rows]
            self._counts = [0] * len(rows)
        for index, tokens in enumerate(rows):
            self._sums[index] += tokens.double().sum(dim=0).cpu()
            self._counts[index] += int(tokens.shape[0])

    def finish(self) -> None:
        """Stack the CLS rows (and the masks) once every image is in."""
        if self.cls_rows:
            self.cls = torch.stack(self.cls_rows)
            self.cls_rows = []
        if self.foreground_rows:
            self.foreground = torch.stack(self.foreground_rows)
            self.foreground_rows = []
        if self._sums:
            self.means = [(s / max(1, n)).float() for s, n in zip(self._sums, self._counts, strict=True)]

    def _gather(self, level: Level, indices: torch.Tensor, width: int) -> torch.Tensor:
        if isinstance(level, PatchStore):
            return level.gather(indices.cpu()).view(len(indices), self.positions, width)
        return level.index_select(0, indices.cpu()).float()

    def gather_level(self, level: int, indices: torch.Tensor) -> torch.Tensor:
        """(k, P, C) float32 tokens of level ``level`` of the images at ``indices``."""
        return self._gather(self.levels[level], indices, self.widths[level])

    def gather_points(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """((k, P, C3) float32 3D tokens, (k, P) foreground) of the images at ``indices``."""
        if self.points is None:
            raise ValueError("this memory holds no 3D tokens (it was built with modality 2d)")
        return self._gather(self.points, indices, self.point_width), self.foreground.index_select(0, indices.cpu())

    def bytes_per_image(self) -> int:
        """Bytes one stored image takes: its tokens at every level (and 3D), its CLS row and its mask."""
        size = self.dtype.itemsize
        tokens = sum(self.widths) * self.positions * size + self.point_width * self.positions * size
        mask = self.positions if self.points is not None else 0
        return tokens + 4 * (int(self.cls.shape[1]) if self.cls.ndim == 2 else 0) + mask

    def mean(self, level: int | None) -> torch.Tensor:
        """Per-channel mean over the stored patches of a level (None: the 3D tokens, foreground rows only)."""
        return self.means[len(self.levels) if level is None else level]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Everything as flat tensors for the model file (this materialises spilled tokens once)."""

        def whole(level: Level, width: int) -> torch.Tensor:
            if isinstance(level, torch.Tensor):
                return level
            blocks = [level.block(i) for i in range(len(level.chunks))]
            return torch.cat(blocks).view(-1, self.positions, width)

        out = {"cls": self.cls}
        out.update({f"mean.{i}": mean for i, mean in enumerate(self.means)})
        out.update({f"level.{i}": whole(lv, w) for i, (lv, w) in enumerate(zip(self.levels, self.widths, strict=True))})
        if self.points is not None:
            out["points"] = whole(self.points, self.point_width)
            out["foreground"] = self.foreground
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], grid: tuple[int, int], levels: int) -> RadMemory:
        """Inverse of :meth:`tensors`, checking the shapes against each other.

        Raises:
            ValueError: when a tensor is missing or does not fit the others.
        """
        bank = tensors["cls"].float()
        count = int(bank.shape[0])
        level_tensors = [tensors[f"level.{i}"] for i in range(levels)]
        dtype = "float32" if level_tensors and level_tensors[0].dtype == torch.float32 else "float16"
        memory = cls(grid, dtype)
        positions = memory.positions
        for tensor in level_tensors:
            if tensor.ndim != 3 or tensor.shape[:2] != (count, positions):
                raise ValueError(f"level tokens of shape {tuple(tensor.shape)} for {count} images of {positions}")
        memory.cls, memory.levels = bank, list(level_tensors)
        memory.widths = [int(t.shape[2]) for t in level_tensors]
        if "points" in tensors:
            points, foreground = tensors["points"], tensors["foreground"].bool()
            if points.shape[:2] != (count, positions) or foreground.shape != (count, positions):
                raise ValueError(f"3D tokens {tuple(points.shape)} / mask {tuple(foreground.shape)} do not fit")
            memory.points, memory.foreground, memory.point_width = points, foreground, int(points.shape[2])
        memory.means = [tensors[f"mean.{i}"].float() for i in range(levels + (memory.points is not None))]
        widths = [*memory.widths, *([memory.point_width] if memory.points is not None else [])]
        if [int(m.numel()) for m in memory.means] != widths:
            raise ValueError(f"channel means of widths {[int(m.numel()) for m in memory.means]} for {widths}")
        return memory

    def close(self) -> None:
        """Delete spilled files."""
        for level in [*self.levels, self.points]:
            if isinstance(level, PatchStore):
                level.close()
