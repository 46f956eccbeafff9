"""M3DM's patch alignment (the official grids) and the UFF trained once for several categories."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from mmiad.features.pipeline import SampleFeatures
from mmiad.methods.m3dm.fusion import FeatureFusionBlock


@dataclass
class PatchSets:
    """One sample's patch rows: point (point_grid², fg mask), RGB (rgb_grid²) and RGB pooled to point_grid²."""

    point: torch.Tensor
    foreground: torch.Tensor
    rgb: torch.Tensor
    rgb_fine: torch.Tensor


def patch_sets(features: SampleFeatures, rgb_grid: int, point_grid: int) -> PatchSets:
    """The official alignment: point map via ``to_grid``, RGB adaptive-pooled to 28, then to 56 (a 2× repeat)."""
    rgb = F.adaptive_avg_pool2d(features.image.float().unsqueeze(0), rgb_grid)
    rgb_fine = F.adaptive_avg_pool2d(rgb, point_grid)[0]
    return PatchSets(
        point=features.points.to_grid(point_grid).float().flatten(1).T.contiguous(),
        foreground=features.points.foreground(point_grid).flatten(),
        rgb=rgb[0].flatten(1).T.contiguous(),
        rgb_fine=rgb_fine.flatten(1).T.contiguous(),
    )


@dataclass
class SharedUFF:
    """A UFF trained once for several categories (``uff_scope="all"``), handed to each category's model.

    Attributes:
        block: The trained fusion block (eval mode, frozen).
        loss_history: Mean InfoNCE per epoch.
        categories: The categories whose training samples it saw.
        n_samples: How many samples that was.
    """

    block: FeatureFusionBlock
    loss_history: list[float] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)
    n_samples: int = 0
