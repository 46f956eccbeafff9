"""Uni-RCM's reference-guided mapping network (paper Sec. II-B), one per direction (2D→3D and 3D→2D).

A unified model sees every category, so a plain per-pixel MLP (CFM) has to fit several feature manifolds at once.
Uni-RCM adds a *learnable reference* (one vector per grid position, shared by all samples) that the features
query (RFI branch, eq. 1) and that gates their channels (RAM branch, eq. 2); the two are mixed by a learnable
α (eq. 3). The network runs on whole G×G grids because the RFI branch convolves over the grid, so inputs are
(B, G·G, C) tensors.

``branches`` reproduces the paper's Tab. III ablation: ``none`` is the baseline mapping (CFM's MLP),
``rfi``/``ram`` keep one branch, ``rfi+ram`` is the full block.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.distributed as dist
from torch import nn

from mmiad.methods.cfm.mapping import FeatureProjectionMLP

BRANCHES = ("none", "rfi", "ram", "rfi+ram")


def sincos_position_encoding(grid: int, dim: int) -> torch.Tensor:
    """Fixed 2D sine-cosine encoding, (G·G, dim): half the channels encode the row, half the column.

    Each half holds sin and cos of the position at dim/4 geometrically spaced frequencies (base 10000), the usual
    ViT/MAE construction; positions are in row-major order so row i·G+j is grid cell (i, j).
    """
    if dim % 4:
        raise ValueError(f"the position encoding needs a hidden size divisible by 4, got {dim}")
    quarter = dim // 4
    frequencies = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def encode(positions: torch.Tensor) -> torch.Tensor:
        angles = positions.reshape(-1, 1) * frequencies
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()


class GridBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics span all data-parallel ranks.

    Plain BatchNorm would normalise each rank's share of a batch on its own, so a 2-process run would not match a
    1-process run with the same global batch; ``SyncBatchNorm`` does not run on CPU. This sums the per-channel
    moments across ranks with an autograd-aware all-reduce, so gradients also flow through the shared statistics.
    State-dict names are BatchNorm2d's.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise (B, C, H, W); synchronised statistics only while training under torch.distributed."""
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        count = torch.tensor([x.shape[0] * x.shape[2] * x.shape[3]], dtype=x.dtype, device=x.device)
        moments = torch.cat([x.sum(dim=(0, 2, 3)), (x * x).sum(dim=(0, 2, 3)), count])
        with warnings.catch_warnings():  # deprecated in favour of a private API; still the public autograd one
            warnings.simplefilter("ignore", FutureWarning)
            moments = all_reduce(moments)
        channels = x.shape[1]
        total = moments[-1]
        mean = moments[:channels] / total
        var = (moments[channels : 2 * channels] / total - mean * mean).clamp_min(0.0)
        with torch.no_grad():
            self.num_batches_tracked += 1
            unbiased = var * total / (total - 1).clamp_min(1.0)
            self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean.detach())
            self.running_var.mul_(1 - self.momentum).add_(self.momentum * unbiased.detach())
        scale = self.weight / torch.sqrt(var + self.eps)
        return (x - mean.view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


class FeatureEmbedding(nn.Module):
    """Linear(in, hidden) (Kaiming, fan-out, as the official code) → LayerNorm → + fixed 2D position encoding."""

    def __init__(self, in_features: int, hidden: int, grid: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_features, hidden)
        nn.init.kaiming_normal_(self.proj.weight, mode="fan_out")
        nn.init.zeros_(self.proj.bias)
        self.norm = nn.LayerNorm(hidden)
        self.register_buffer("position", sincos_position_encoding(grid, hidden).unsqueeze(0), persistent=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, G·G, in) → (B, G·G, hidden)."""
        return self.norm(self.proj(features)) + self.position


class RefGuideBlock(nn.Module):
    """One reference-guided block: RFI and/or RAM branch, α-fusion, pre-LN FFN with residual (eqs. 1-3).

    Args:
        dim: Hidden size C.
        grid: Grid side G (the RFI convolution reshapes G·G rows back to the grid).
        branches: ``rfi``, ``ram`` or ``rfi+ram``; a missing branch has no parameters at all, and with a single
            branch there is no α (the branch output is the fused feature).
        ffn_ratio: FFN expansion (2 in the official code).
    """

    def __init__(self, dim: int, grid: int, branches: str = "rfi+ram", ffn_ratio: int = 2) -> None:
        super().__init__()
        if branches not in BRANCHES[1:]:
            raise ValueError(f"a RefGuideBlock needs branches in {BRANCHES[1:]}, got {branches!r}")
        self.grid = grid
        self.use_rfi = "rfi" in branches
        self.use_ram = "ram" in branches
        self.norm_features = nn.LayerNorm(dim)
        self.norm_reference = nn.LayerNorm(dim)
        if self.use_rfi:
            self.rfi_q = nn.Linear(dim, dim)
            self.rfi_k = nn.Linear(dim, dim)
            self.rfi_v = nn.Linear(dim, dim)
            # No conv bias: the BatchNorm right after cancels it, so its gradient is pure rounding noise that
            # Adam would amplify into random drift (and break multi-process reproducibility).
            self.rfi_conv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim, bias=False)
            self.rfi_bn = GridBatchNorm(dim)
            self.rfi_out = nn.Linear(dim, dim)  # W_RFI
        if self.use_ram:
            self.ram_gate = nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU(), nn.Linear(dim, dim))
            self.ram_out = nn.Linear(dim, dim)  # W_RAM
        if self.use_rfi and self.use_ram:
            self.alpha_logit = nn.Parameter(torch.zeros(()))
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_ratio * dim), nn.GELU(), nn.Linear(ffn_ratio * dim, dim))

    @property
    def alpha(self) -> torch.Tensor:
        """Weight of the RFI branch in the fusion (sigmoid of a logit initialised at 0, so 0.5 at start)."""
        return torch.sigmoid(self.alpha_logit)

    def _rfi(self, features: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        q, k, v = self.rfi_q(features), self.rfi_k(reference), self.rfi_v(reference)
        retrieved = torch.sigmoid(q * k / math.sqrt(q.shape[-1])) * v
        batch, _, dim = retrieved.shape
        grid = retrieved.transpose(1, 2).reshape(batch, dim, self.grid, self.grid)
        grid = self.rfi_bn(self.rfi_conv(grid))
        return self.rfi_out(grid.flatten(2).transpose(1, 2))

    def _ram(self, features: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        gate = self.ram_gate(torch.cat([features, reference.expand_as(features)], dim=-1))
        return self.ram_out(features * torch.sigmoid(gate))

    def forward(self, features: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """(B, G·G, C) features and a (1, G·G, C) reference → (B, G·G, C)."""
        features = self.norm_features(features)
        reference = self.norm_reference(reference)
        if self.use_rfi and self.use_ram:
            alpha = self.alpha
            fused = alpha * self._rfi(features, reference) + (1 - alpha) * self._ram(features, reference)
        elif self.use_rfi:
            fused = self._rfi(features, reference)
        else:
            fused = self._ram(features, reference)
        return fused + self.ffn(self.ffn_norm(fused))


class RefGuidedMapping(nn.Module):
    """One direction of Uni-RCM: embedding, learnable reference, ``num_blocks`` blocks, output head.

    With ``branches="none"`` it is the paper's baseline mapping: CFM's per-pixel MLP (no reference, no grid).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        hidden: int = 512,
        grid: int = 56,
        num_blocks: int = 3,
        branches: str = "rfi+ram",
    ) -> None:
        super().__init__()
        if branches not in BRANCHES:
            raise ValueError(f"unknown branches {branches!r}; expected one of {BRANCHES}")
        self.in_features, self.out_features, self.grid, self.branches = in_features, out_features, grid, branches
        if branches == "none":
            self.baseline = FeatureProjectionMLP(in_features, out_features)
            return
        self.embed = FeatureEmbedding(in_features, hidden, grid)
        self.reference = nn.Parameter(torch.randn(1, grid * grid, hidden) * 0.1)
        self.register_buffer(
            "reference_position", sincos_position_encoding(grid, hidden).unsqueeze(0), persistent=False
        )
        self.blocks = nn.ModuleList(RefGuideBlock(hidden, grid, branches) for _ in range(num_blocks))
        self.head = nn.Sequential(
            nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, out_features)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, G·G, in) → (B, G·G, out)."""
        if features.dim() != 3 or features.shape[1] != self.grid * self.grid or features.shape[2] != self.in_features:
            raise ValueError(
                f"expected (batch, {self.grid * self.grid}, {self.in_features}) features, got {tuple(features.shape)}"
            )
        if self.branches == "none":
            return self.baseline(features)
        hidden = self.embed(features)
        reference = self.reference + self.reference_position
        for block in self.blocks:
            hidden = block(hidden, reference)
        return self.head(hidden)
