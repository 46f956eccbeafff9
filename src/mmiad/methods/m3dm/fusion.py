"""M3DM's Unsupervised Feature Fusion (UFF): per-modality LayerNorm + MLP trained with patch-wise InfoNCE.

The two MLPs are trained so that the RGB and point features of the *same* patch agree (through two 256-d heads)
and differ from other patches'. At inference only the MLP outputs are used, concatenated, as the fused feature;
the heads exist only for the loss. Module names follow the official ``FeatureFusionBlock`` (``xyz_norm``,
``xyz_mlp.fc1``, ``rgb_head`` …) so its released checkpoint layout is recognisable.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

HEAD_DIM = 256


class Mlp(nn.Module):
    """Linear → GELU → Linear with the hidden width ``ratio`` × input (timm's Mlp naming)."""

    def __init__(self, dim: int, ratio: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, int(dim * ratio))
        self.act = nn.GELU()
        self.fc2 = nn.Linear(int(dim * ratio), dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class FeatureFusionBlock(nn.Module):
    """UFF for point features of width ``xyz_dim`` and RGB features of width ``rgb_dim``."""

    def __init__(self, xyz_dim: int, rgb_dim: int, mlp_ratio: float = 4.0, temperature: float = 1.0) -> None:
        super().__init__()
        self.xyz_norm = nn.LayerNorm(xyz_dim)
        self.xyz_mlp = Mlp(xyz_dim, mlp_ratio)
        self.rgb_norm = nn.LayerNorm(rgb_dim)
        self.rgb_mlp = Mlp(rgb_dim, mlp_ratio)
        self.xyz_head = nn.Linear(xyz_dim, HEAD_DIM)
        self.rgb_head = nn.Linear(rgb_dim, HEAD_DIM)
        self.temperature = temperature

    def fuse(self, xyz: torch.Tensor, rgb: torch.Tensor) -> torch.Tensor:
        """N×(xyz_dim + rgb_dim): the concatenated MLP outputs, the fused feature of the memory bank."""
        return torch.cat([self.xyz_mlp(self.xyz_norm(xyz)), self.rgb_mlp(self.rgb_norm(rgb))], dim=-1)

    def contrastive_loss(self, xyz: torch.Tensor, rgb: torch.Tensor) -> torch.Tensor:
        """Patch-wise InfoNCE over N aligned foreground patches (row i of both is the same patch).

        As the official code: query = RGB head, key = point head, both L2-normalised, logits ``q kᵀ / T``,
        cross-entropy against the diagonal, one direction only, scaled by ``2T``.
        """
        query = F.normalize(self.rgb_head(self.rgb_mlp(self.rgb_norm(rgb))), dim=1)
        key = F.normalize(self.xyz_head(self.xyz_mlp(self.xyz_norm(xyz))), dim=1)
        logits = query @ key.T / self.temperature
        labels = torch.arange(logits.shape[0])
        return F.cross_entropy(logits, labels) * (2 * self.temperature)


def cosine_lr(step: int, total_steps: int, warmup_steps: int, base_lr: float) -> float:
    """Linear warm-up then half-cycle cosine to zero, per iteration (the official ``adjust_learning_rate``)."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * step / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / span))


def official_training_rgb(rgb_coarse: torch.Tensor, fine_rows: int) -> torch.Tensor:
    """The RGB rows the official UFF training saw: the coarse rows tiled, *not* a spatial upsample.

    The official feature dump builds its 3136 RGB rows from the 784 coarse ones by tiling them ``k`` = 4 times and
    reading the tiles column-wise, so fine position ``p`` gets coarse row ``(k·(p mod n) + p div n) mod n``; at
    test time UFF gets the spatially correct pooled rows. Only ``compat`` reproduces this mismatch.

    Args:
        rgb_coarse: n×C rows of the coarse RGB grid (row-major).
        fine_rows: Rows of the fine (point) grid, a multiple of n.
    """
    coarse_rows = rgb_coarse.shape[0]
    if fine_rows % coarse_rows:
        raise ValueError(f"{fine_rows} fine rows are not a multiple of {coarse_rows} coarse rows")
    factor = fine_rows // coarse_rows
    position = torch.arange(fine_rows)
    return rgb_coarse[(factor * (position % coarse_rows) + position // coarse_rows) % coarse_rows]
