"""CMDR-IAD's four trainable networks: two cross-modal mapping MLPs and the 2D and 3D reconstruction decoders.

Layer for layer as the official ``networks/{Map,Dec2d,Dec3d}.py`` (ECGAI-Research/CMDR-IAD at 3d201cd). The
attribute names and the ``nn.Sequential`` positions are the official ones, so an official ``state_dict`` loads
into these modules unchanged (``mmiad import --method cmdr``). Sizes follow the feature widths and the grid: the
official networks are built for 768/1152 channels on a 224×224 grid (50176 tokens); smaller grids build
proportionally smaller decoders (Decoder3D's first layer maps the whole token axis, so its size is tied to the grid).
"""

from __future__ import annotations

import itertools
import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

#: Official widths that do not follow the feature width (``Dec2d.py``'s conv refinement, ``Dec3d.py``'s decoder).
DEC2D_CONV_WIDTHS = (256, 128)
DEC3D_WIDTHS = (768, 512, 256, 128)
#: Decoder3D halves the token axis five times before decoding it back with stride-2 transposed convolutions.
DEC3D_UPSAMPLINGS = 5
DEC2D_HEADS = 8
DEC2D_WINDOW = 128
DROPOUT = 0.1


class MappingMLP(nn.Module):
    """``FeatureMappigMLP``: Linear → GELU → [Linear, GELU, LayerNorm, Dropout, Linear, GELU, LayerNorm] → Linear.

    Token-wise, hidden width (in+out)//2 (960 for 768↔1152). Unlike CFM's MLP it has a third 960×960 layer, two
    LayerNorms and a dropout of 0.1.
    """

    def __init__(self, in_features: int, out_features: int, dropout: float = DROPOUT) -> None:
        super().__init__()
        hidden = (in_features + out_features) // 2
        self.input = nn.Linear(in_features, hidden)
        self.projection = nn.Sequential(
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.LayerNorm(hidden),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.LayerNorm(hidden),
        )
        self.output = nn.Linear(hidden, out_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Map (..., in_features) tokens to (..., out_features)."""
        return self.output(self.projection(F.gelu(self.input(features))))


class SameSizeConvTranspose2d(nn.ConvTranspose2d):
    """A stride-1 ``ConvTranspose2d`` (kernel k, padding p) computed as the equivalent ``conv2d``.

    With stride 1 a transposed convolution is a plain convolution with the kernel flipped, its in/out axes swapped
    and padding k − 1 − p. The parameters keep ``ConvTranspose2d``'s layout (official checkpoints load unchanged);
    only the computation changes, because PyTorch's CPU kernel for transposed 2-D convolutions is a slow generic
    path (two orders of magnitude slower than ``conv2d`` for Decoder2D's layers, measured on 2 cores).
    """

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        """(B, C_in, H, W) → (B, C_out, H, W) (stride 1, kernel 2p + 1)."""
        if self.stride != (1, 1) or self.groups != 1 or self.dilation != (1, 1) or any(self.output_padding):
            raise ValueError("SameSizeConvTranspose2d supports stride 1, one group, no dilation or output padding")
        kernel = self.weight.flip(-1, -2).transpose(0, 1)
        pads = cast(tuple[int, ...], self.padding)
        padding = tuple(k - 1 - p for k, p in zip(self.kernel_size, pads, strict=True))
        return F.conv2d(x, kernel, self.bias, padding=padding)


class ChunkAttention(nn.Module):
    """``SparseAttention1D``: multi-head attention inside consecutive ``window``-token chunks of the sequence.

    The chunks are cut from the raster order (a 128-token chunk wraps across the rows of a 224-wide grid); there is
    no shift and no position bias. A sequence that the window does not divide is zero-padded at the end, and the
    padded keys take part in the last chunk's softmax, as in the official code.
    """

    def __init__(self, dim: int, heads: int, window: int, dropout: float = DROPOUT) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.window = window
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = nn.Dropout(dropout)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) → (B, N, C)."""
        batch, tokens, width = x.shape
        head_dim = width // self.heads
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, head_dim).permute(2, 0, 3, 1, 4)
        pad = -tokens % self.window
        q, k, v = (F.pad(t, (0, 0, 0, pad)) if pad else t for t in qkv)
        chunks = (tokens + pad) // self.window
        q, k, v = (t.reshape(batch, self.heads, chunks, self.window, head_dim) for t in (q, k, v))
        weights = self.attn_drop(torch.softmax(q @ k.transpose(-1, -2) * self.scale, dim=-1))
        out = (weights @ v).reshape(batch, self.heads, chunks * self.window, head_dim)[:, :, :tokens]
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(batch, tokens, width)))


class ChunkAttentionBlock(nn.Module):
    """``TunedSparseAttention1D``: one pre-norm block, x + Attn(LN(x)) then x + MLP(LN(x)), MLP ratio 2."""

    def __init__(self, dim: int, heads: int, window: int, dropout: float = DROPOUT) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ChunkAttention(dim, heads, window, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) → (B, N, C)."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def attention_heads(width: int, wanted: int = DEC2D_HEADS) -> int:
    """The official 8 heads when they divide the attention width, else the largest divisor of 8 that does.

    The official width (384) takes 8; narrower features (the weight-free preset's 42 channels, width 21) would
    fail the official assertion, so they get fewer heads instead (a deviation only for non-official widths).
    """
    return math.gcd(width, wanted)


def _projection(width: int, reduced: int) -> nn.Sequential:
    """Both decoders' input projection (official layout, so ``projection.0``... keep the official key names):
    Linear → GELU → LayerNorm → Dropout → Linear → GELU → LayerNorm, from ``width`` down to ``reduced``."""
    return nn.Sequential(
        nn.Linear(width, reduced),
        nn.GELU(),
        nn.LayerNorm(reduced),
        nn.Dropout(DROPOUT),
        nn.Linear(reduced, reduced),
        nn.GELU(),
        nn.LayerNorm(reduced),
    )


class Decoder2D(nn.Module):
    """``Decoder2D``: token projection to C/2, one chunk-attention block, three 3×3 transposed convolutions with
    BatchNorm and GELU on the G×G map, and a head back to C ending in LayerNorm. No skip connection.

    Args:
        dim: Feature width C (768 for DINO ViT-B/8).
        grid: Side G of the token grid (224 officially; N = G² tokens in raster order).
        heads: Attention heads (official 8; see :func:`attention_heads`).
        window: Tokens per attention chunk (official 128).
    """

    def __init__(self, dim: int, grid: int, heads: int | None = None, window: int = DEC2D_WINDOW) -> None:
        super().__init__()
        reduced = dim // 2
        self.grid = grid
        self.reduced = reduced
        self.projection = _projection(dim, reduced)
        self.attn = ChunkAttentionBlock(reduced, heads or attention_heads(reduced), window)
        wide, narrow = DEC2D_CONV_WIDTHS
        self.conv_decoder = nn.Sequential(
            SameSizeConvTranspose2d(reduced, wide, kernel_size=3, stride=1, padding=1),
            nn.BatchNorm2d(wide),
            nn.GELU(),
            SameSizeConvTranspose2d(wide, narrow, kernel_size=3, stride=1, padding=1),
            nn.BatchNorm2d(narrow),
            nn.GELU(),
            SameSizeConvTranspose2d(narrow, reduced, kernel_size=3, stride=1, padding=1),
            nn.BatchNorm2d(reduced),
            nn.GELU(),
        )
        self.reconstruct = nn.Sequential(
            nn.Linear(reduced, 2 * dim), nn.GELU(), nn.Dropout(DROPOUT), nn.Linear(2 * dim, dim), nn.LayerNorm(dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, G², C) tokens in raster order → (B, G², C)."""
        batch, tokens, _ = x.shape
        if tokens != self.grid * self.grid:
            raise ValueError(f"Decoder2D built for a {self.grid}² grid got {tokens} tokens")
        x = self.attn(self.projection(x))
        image = x.transpose(1, 2).reshape(batch, self.reduced, self.grid, self.grid)
        x = self.conv_decoder(image).flatten(2).transpose(1, 2)
        return self.reconstruct(x)


class Decoder3D(nn.Module):
    """``Decoder3D``: each channel's G²-long raster signal compressed to G²/32 by two dense layers, decoded back by
    five stride-2 1-D transposed convolutions (BatchNorm + GELU, Tanh last), then a multiplicative squeeze-excitation.

    Acts along the token axis, not the channels: the first Linear (50176 → 1568 on a 224² grid, 78.7 M weights)
    mixes every position of the grid. Output values lie in (−1, 1).

    Args:
        dim: Feature width C (1152 for Point-MAE).
        grid: Side G of the token grid; G² must be divisible by 32 (G a multiple of 8).
    """

    def __init__(self, dim: int, grid: int) -> None:
        super().__init__()
        length = grid * grid
        reduced = length // 2**DEC3D_UPSAMPLINGS
        if reduced * 2**DEC3D_UPSAMPLINGS != length:
            raise ValueError(f"Decoder3D needs a token count divisible by 32; a {grid}² grid has {length}")
        self.length = length
        self.projection = _projection(length, reduced)
        widths = (dim, *DEC3D_WIDTHS, dim)
        layers: list[nn.Module] = []
        for index, (inner, outer) in enumerate(itertools.pairwise(widths)):
            layers.append(nn.ConvTranspose1d(inner, outer, kernel_size=4, stride=2, padding=1))
            layers.extend([nn.BatchNorm1d(outer), nn.GELU()] if index < len(widths) - 2 else [nn.Tanh()])
        self.decoder = nn.Sequential(*layers)
        squeeze = max(1, dim // 8)  # official dim // 8; at least one channel for features narrower than 8
        self.attention = nn.Sequential(
            nn.AdaptiveAvgPool1d(1),
            nn.Conv1d(dim, squeeze, kernel_size=1),
            nn.ReLU(),
            nn.Conv1d(squeeze, dim, kernel_size=1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, G², C) tokens in raster order → (B, G², C)."""
        if x.shape[1] != self.length:
            raise ValueError(f"Decoder3D built for {self.length} tokens got {x.shape[1]}")
        decoded = self.decoder(self.projection(x.transpose(1, 2)))
        return (decoded * self.attention(decoded)).transpose(1, 2)


def build_networks(channels_2d: int, channels_3d: int, grid: int) -> dict[str, nn.Module]:
    """The four networks by their official checkpoint names (``map2Dto3D``, ``map3Dto2D``, ``Dec2D``, ``Dec3D``)."""
    return {
        "map2Dto3D": MappingMLP(channels_2d, channels_3d),
        "map3Dto2D": MappingMLP(channels_3d, channels_2d),
        "Dec2D": Decoder2D(channels_2d, grid),
        "Dec3D": Decoder3D(channels_3d, grid),
    }
