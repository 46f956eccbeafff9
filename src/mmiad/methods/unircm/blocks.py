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
from typing import cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mmiad.methods.cfm.mapping import FeatureProjectionMLP

BRANCHES = ("none", "rfi", "ram", "rfi+ram")


def sincos_position_encoding(grid: int, dim: int) -> torch.Tensor:
    """Fixed 2D sine-cosine encoding, (G·G, dim), in the official ``PositionalEncoding2D`` channel layout.

    The first half of the channels encodes the column, the second half the row; within each half, even channels
    hold sin and odd channels cos of the position at dim/4 geometrically spaced frequencies
    ``10000^(-2i/(dim/2))``. Rows are in row-major order (row i·G+j is grid cell (i, j)). The layout matters
    because released checkpoints were trained against it (and store it as a buffer); computed in float32 with
    the same operations as the official code so a fresh model's buffer equals a released one's.
    """
    if dim % 4:
        raise ValueError(f"the position encoding needs a hidden size divisible by 4, got {dim}")
    half = dim // 2
    frequencies = torch.exp(torch.arange(0.0, half, 2) * -(math.log(10000.0) / half))
    angles = torch.arange(0.0, grid).unsqueeze(1) * frequencies  # (G, dim/4): position × frequency
    encoding = torch.zeros(grid, grid, dim)
    encoding[:, :, 0:half:2] = angles.sin().unsqueeze(0)  # column j of cell (i, j)
    encoding[:, :, 1:half:2] = angles.cos().unsqueeze(0)
    encoding[:, :, half::2] = angles.sin().unsqueeze(1)  # row i
    encoding[:, :, half + 1 :: 2] = angles.cos().unsqueeze(1)
    return encoding.reshape(grid * grid, dim)


class PositionEncoding(nn.Module):
    """Adds the fixed encoding, held as a *persistent* buffer ``pe`` (1, G·G, dim) as in released checkpoints.

    Persisting it (rather than recomputing it) means a model file carries the exact encoding its weights were
    trained with, whatever the layout of the code that loads it.
    """

    pe: torch.Tensor  # registered buffer

    def __init__(self, dim: int, grid: int) -> None:
        super().__init__()
        self.register_buffer("pe", sincos_position_encoding(grid, dim).unsqueeze(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x + encoding, broadcast over the batch."""
        return x + self.pe


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
        # A GridBatchNorm is always built tracking running statistics with a fixed momentum.
        assert self.running_mean is not None and self.running_var is not None
        assert self.num_batches_tracked is not None and self.momentum is not None
        with torch.no_grad():
            self.num_batches_tracked += 1
            unbiased = var * total / (total - 1).clamp_min(1.0)
            self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean.detach())
            self.running_var.mul_(1 - self.momentum).add_(self.momentum * unbiased.detach())
        scale = self.weight / torch.sqrt(var + self.eps)
        return (x - mean.view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


class FeatureEmbedding(nn.Module):
    """Linear(in, hidden) → LayerNorm → + fixed 2D position encoding (official ``FeatureEmbedding``).

    The projection is initialised as the official code does: Kaiming normal, fan-out, gain 1 (``linear``), zero
    bias. State-dict names: ``proj``, ``norm``, ``pos_enc.pe``.
    """

    def __init__(self, in_features: int, hidden: int, grid: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_features, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.pos_enc = PositionEncoding(hidden, grid)
        nn.init.kaiming_normal_(self.proj.weight, mode="fan_out", nonlinearity="linear")
        nn.init.zeros_(self.proj.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, G·G, in) → (B, G·G, hidden)."""
        return self.pos_enc(self.norm(self.proj(features)))


class RefGuideBlock(nn.Module):
    """One reference-guided block: RFI and/or RAM branch, α-fusion, pre-LN FFN with residual (eqs. 1-3).

    Parameter names, construction order and initialisation follow the official ``RefGuideBlock``
    (``models/rcm_nets.py``), so a released checkpoint loads strictly and a fresh block under the same seed
    draws the same initial weights: every Linear Xavier-uniform with zero bias, the depthwise conv Kaiming
    normal (fan-out) with zero bias.

    The depthwise conv keeps its bias (released checkpoints hold one, and it matters in eval mode, where the
    BatchNorm subtracts running statistics) but it gets no gradient: the BatchNorm right after subtracts the
    batch mean, so its true gradient is exactly zero and the computed one is rounding noise, which Adam would
    amplify into a random drift (and break multi-process reproducibility).

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
        self.feat_norm = nn.LayerNorm(dim)
        self.ref_norm = nn.LayerNorm(dim)
        if self.use_rfi:
            self.rfi_q = nn.Linear(dim, dim)
            self.rfi_k = nn.Linear(dim, dim)
            self.rfi_v = nn.Linear(dim, dim)
            self.rfi_local = nn.Sequential(
                nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim), GridBatchNorm(dim)
            )
            self.rfi_proj = nn.Linear(dim, dim)  # W_RFI
        if self.use_ram:
            self.ram_gate = nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU(), nn.Linear(dim, dim), nn.Sigmoid())
            self.ram_proj = nn.Linear(dim, dim)  # W_RAM
        if self.use_rfi and self.use_ram:
            self.branch_alpha = nn.Parameter(torch.zeros(()))
        self.ffn_norm = nn.LayerNorm(dim)
        hidden = ffn_ratio * dim
        # The dropouts (p=0) only keep the official indices: ffn.0 and ffn.3 are the Linear layers.
        self.ffn = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0), nn.Linear(hidden, dim), nn.Dropout(0.0)
        )
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                assert module.bias is not None  # every Linear of the block has a bias
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Conv2d):
                assert module.bias is not None  # so does the depthwise conv
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
                nn.init.zeros_(module.bias)

    @property
    def alpha(self) -> torch.Tensor:
        """Weight of the RFI branch in the fusion (sigmoid of a logit initialised at 0, so 0.5 at start)."""
        return torch.sigmoid(self.branch_alpha)

    def _rfi(self, features: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        q, k, v = self.rfi_q(features), self.rfi_k(reference), self.rfi_v(reference)
        retrieved = torch.sigmoid(q * k / math.sqrt(q.shape[-1])) * v
        batch, _, dim = retrieved.shape
        grid = retrieved.transpose(1, 2).reshape(batch, dim, self.grid, self.grid)
        conv, norm = cast(nn.Conv2d, self.rfi_local[0]), self.rfi_local[1]
        assert conv.bias is not None  # built with a bias (released checkpoints hold one)
        grid = F.conv2d(grid, conv.weight, conv.bias.detach(), padding=conv.padding, groups=conv.groups)
        return self.rfi_proj(norm(grid).flatten(2).transpose(1, 2))

    def _ram(self, features: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        gate = self.ram_gate(torch.cat([features, reference.expand_as(features)], dim=-1))
        return self.ram_proj(features * gate)

    def forward(self, features: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """(B, G·G, C) features and a (1, G·G, C) reference → (B, G·G, C)."""
        features = self.feat_norm(features)
        reference = self.ref_norm(reference)
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

    Parameter names follow the official ``UniRCM_Net`` (``feat_embed``, ``ref_param``, ``ref_pos``, ``blocks``,
    ``final_norm``, ``out_proj``), so a released ``UniRCM_*.pth`` loads strictly (see :mod:`.official`).
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
        self.feat_embed = FeatureEmbedding(in_features, hidden, grid)
        self.ref_param = nn.Parameter(torch.randn(1, grid * grid, hidden) * 0.1)
        self.ref_pos = PositionEncoding(hidden, grid)
        self.blocks = nn.ModuleList(RefGuideBlock(hidden, grid, branches) for _ in range(num_blocks))
        self.final_norm = nn.LayerNorm(hidden)
        self.out_proj = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, out_features))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, G·G, in) → (B, G·G, out)."""
        if features.dim() != 3 or features.shape[1] != self.grid * self.grid or features.shape[2] != self.in_features:
            raise ValueError(
                f"expected (batch, {self.grid * self.grid}, {self.in_features}) features, got {tuple(features.shape)}"
            )
        if self.branches == "none":
            return self.baseline(features)
        hidden = self.feat_embed(features)
        reference = self.ref_pos(self.ref_param)
        for block in self.blocks:
            hidden = block(hidden, reference)
        return self.out_proj(self.final_norm(hidden))


#: A key only model files written with mmiad's earlier Uni-RCM layout (before the official names) hold.
LEGACY_LAYOUT_KEY = "embed.proj.weight"


def load_mapping_state(module: RefGuidedMapping, state: dict[str, torch.Tensor], where: str) -> None:
    """Load a mapping's tensors from an mmiad model file, refusing the pre-official layout with a clear message.

    Raises:
        ModelFileError: For a model file saved with the old parameter names (no conv bias, recomputed position
            encodings): its numbers cannot be carried over exactly, so it must be retrained (or re-imported).
    """
    from mmiad.methods.modelfile import ModelFileError

    if LEGACY_LAYOUT_KEY in state:
        raise ModelFileError(
            f"{where}: this Uni-RCM model file uses mmiad's earlier network layout; the networks now follow the "
            "official parameter layout (released checkpoints load as they are). Retrain the model with this "
            "version of mmiad, or import the official checkpoint with `mmiad import --method unircm`"
        )
    try:
        module.load_state_dict(state)
    except RuntimeError as error:
        raise ModelFileError(f"{where}: the Uni-RCM network tensors do not fit the configuration ({error})") from error
