"""G2SF's two unimodal memory banks and what each patch keeps from them.

They differ from M3DM's: the RGB bank holds DINO's own 28×28 patches (no 2× duplication), standardised with one
scalar mean and std over the whole bank; the point bank holds the 56×56 projection of Point-MAE's 512 groups,
every patch (background rows, exactly zero, included), unnormalised. Each gets its own 10 % greedy coreset
(:class:`~mmiad.methods.memorybank.MemoryBank`). At scoring, RGB patches are standardised and repeated 2×2 onto
the 56×56 grid, and every patch keeps, per modality, its nearest-neighbour distance and its ``top_k`` nearest
coreset indices (ascending; column 0 is the nearest).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmiad.features.pipeline import SampleFeatures
from mmiad.methods.memorybank import MemoryBank


@dataclass
class PatchRows:
    """One sample's patch rows.

    Attributes:
        rgb: rgb_grid²×C2 raw RGB patches (what the RGB bank collects).
        point: point_grid²×C3 point patches (background rows are exactly zero).
    """

    rgb: torch.Tensor
    point: torch.Tensor


def patch_rows(features: SampleFeatures, rgb_grid: int, point_grid: int) -> PatchRows:
    """RGB adaptive-pooled to ``rgb_grid`` (identity for DINO at 224), points by the official projection."""
    rgb = F.adaptive_avg_pool2d(features.image.float().unsqueeze(0), rgb_grid)[0]
    point = features.points.to_grid(point_grid).float()
    return PatchRows(rgb=rgb.flatten(1).T.contiguous(), point=point.flatten(1).T.contiguous())


def upsample_rgb(rows: torch.Tensor, rgb_grid: int, point_grid: int) -> torch.Tensor:
    """rgb_grid²×C rows → point_grid²×C rows, each patch repeated (nearest) over its block, row-major."""
    grid = rows.T.reshape(1, rows.shape[1], rgb_grid, rgb_grid)
    fine = F.interpolate(grid, size=(point_grid, point_grid), mode="nearest")
    return fine[0].flatten(1).T.contiguous()


@dataclass
class Neighbours:
    """Per patch and modality (RGB, point): the fused-grid features and their nearest coreset entries.

    Attributes:
        features: P×(C2 + C3): standardised RGB (upsampled) ‖ raw point features.
        distances: P×2 raw nearest-neighbour distances (RGB, point).
        indices: P×2k coreset indices: RGB top-k ‖ point top-k, nearest first.
        background: P bool, point rows that are exactly zero (official: row sum == 0).
    """

    features: torch.Tensor
    distances: torch.Tensor
    indices: torch.Tensor
    background: torch.Tensor


class UnimodalBanks:
    """The RGB and point banks of one category, built from training patch rows.

    Args:
        rgb: Empty bank for the RGB patches (its statistics become the scalar standardisation).
        point: Empty bank for the point patches (kept raw: mean 0, std 1).
        rgb_grid: RGB grid (28).
        point_grid: Point grid (56).
    """

    def __init__(self, rgb: MemoryBank, point: MemoryBank, rgb_grid: int, point_grid: int) -> None:
        self.rgb, self.point = rgb, point
        self.rgb_grid, self.point_grid = rgb_grid, point_grid

    def add(self, rows: PatchRows) -> None:
        """Collect one training image's patches (all of them, background included)."""
        self.rgb.add(rows.rgb)
        self.point.add(rows.point)

    def finalize(self, progress: bool = False) -> None:
        """Standardise the RGB bank with its scalar mean/std, keep each bank's own coreset."""
        mean, std = self.rgb.statistics()
        self.rgb.finalize(mean=mean, std=std, progress=progress)
        self.point.finalize(mean=0.0, std=1.0, progress=progress)

    @property
    def split(self) -> int:
        """Width of the RGB part of a fused row."""
        assert self.rgb.bank is not None
        return int(self.rgb.bank.shape[1])

    def coreset_rows(self, indices: torch.Tensor, rank: int, k: int) -> torch.Tensor:
        """The rank-``rank`` prototype pair of each row: RGB coreset[idx[:, rank]] ‖ point coreset[idx[:, k+rank]]."""
        assert self.rgb.bank is not None and self.point.bank is not None
        return torch.cat([self.rgb.bank[indices[:, rank]], self.point.bank[indices[:, k + rank]]], dim=1)

    def neighbours(self, rows: PatchRows, k: int) -> Neighbours:
        """Features on the point grid, NN distances and the ``k`` nearest coreset indices of every patch."""
        rgb = (rows.rgb.float() - self.rgb.mean) / self.rgb.std
        rgb = upsample_rgb(rgb, self.rgb_grid, self.point_grid)
        rgb_dist, rgb_idx = self.rgb.search.search(rgb, k)
        point_dist, point_idx = self.point.search.search(rows.point.float(), k)
        rgb_idx, point_idx = _pad(rgb_idx, k), _pad(point_idx, k)
        return Neighbours(
            features=torch.cat([rgb, rows.point.float()], dim=1),
            distances=torch.stack([rgb_dist[:, 0], point_dist[:, 0]], dim=1),
            indices=torch.cat([rgb_idx, point_idx], dim=1),
            background=rows.point.sum(dim=1) == 0,
        )


def _pad(indices: torch.Tensor, k: int) -> torch.Tensor:
    """Q×k indices: a coreset smaller than k repeats its farthest neighbour (tiny sets only)."""
    if indices.shape[1] >= k:
        return indices
    return torch.cat([indices, indices[:, -1:].expand(-1, k - indices.shape[1])], dim=1)
