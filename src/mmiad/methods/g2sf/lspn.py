"""The local scale prediction network (LSPN), the global scale σ and the unified anisotropic score.

A memory bank says how far a patch is from its nearest nominal prototype, in one Euclidean metric per modality.
G2SF learns, per patch and prototype, how much each modality's distance should count (a local scale w ∈ (e⁻¹, e)
predicted from the direction of the patch as seen from the prototype and from the prototype itself) and, per
category, a global weight σ per modality. The unified score of one (patch, prototype) pair is

    l = Σ_m σ_m · w_m · ‖f_m − p_m‖ / μ_m,

μ_m being the mean nominal nearest-neighbour distance of modality m. With w ≡ 1 it is a σ-weighted sum of
normalised Euclidean distances. Module and parameter names follow the official ``MultiModalGateNet`` so its
state dict maps one to one.
"""

from __future__ import annotations

import math

import torch
from torch import nn

#: Scale of the unit direction ("to keep values from being tiny"), and the floor of its norm.
DIRECTION_SCALE = 5.0
DIRECTION_EPS = 1e-3
#: ``F.pairwise_distance``'s eps, added to the difference before the norm.
PAIRWISE_EPS = 1e-6


def direction(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """The geometric encoding: 5 · (f − p) / max(‖f − p‖, 1e-3), normalised over the whole concatenation."""
    diff = features - prototypes
    norm = torch.linalg.vector_norm(diff, dim=-1, keepdim=True).clamp_min(DIRECTION_EPS)
    return DIRECTION_SCALE * diff / norm


def modality_distances(features: torch.Tensor, prototypes: torch.Tensor, split: int, mu: torch.Tensor) -> torch.Tensor:
    """(…, 2) isotropic distances ‖f_m − p_m + 1e-6‖ / μ_m of the RGB part ([:split]) and the point part."""
    diff = features - prototypes + PAIRWISE_EPS
    rgb = torch.linalg.vector_norm(diff[..., :split], dim=-1)
    point = torch.linalg.vector_norm(diff[..., split:], dim=-1)
    return torch.stack([rgb, point], dim=-1) / mu.to(diff.dtype)


class _Layer(nn.Module):
    """A Linear wrapped as the official ``MLPnet`` does (``network.<i>.linear``)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(n_in, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class Branch(nn.Module):
    """Linear → ReLU → Dropout → Linear (no activation on the output), the official one-hidden-layer MLPnet."""

    def __init__(self, n_in: int, hidden: int, n_out: int, dropout: float) -> None:
        super().__init__()
        self.network = nn.ModuleList([_Layer(n_in, hidden), _Layer(hidden, n_out)])
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network[1](self.dropout(torch.relu(self.network[0](x))))


class LSPN(nn.Module):
    """Φ(direction, prototype) → (w_RGB, w_point) = exp(tanh(·)) ∈ (e⁻¹, e).

    Args:
        in_dim: Width of the concatenated feature (768 + 1152 = 1920 for DINO + Point-MAE).
        hidden: Branch hidden width (512).
        emb_dim: Branch output width (128).
        dropout: Dropout in both branches and the head (0.5).
    """

    def __init__(self, in_dim: int, hidden: int = 512, emb_dim: int = 128, dropout: float = 0.5) -> None:
        super().__init__()
        self.residual_transformer = Branch(in_dim, hidden, emb_dim, dropout)  # the direction branch
        self.transformer = Branch(in_dim, hidden, emb_dim, dropout)  # the prototype branch
        self.regressor = nn.Sequential(
            nn.Linear(2 * emb_dim, 2 * emb_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(2 * emb_dim, 2)
        )

    def forward(self, directions: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        joint = torch.cat([self.residual_transformer(directions), self.transformer(prototypes)], dim=-1)
        return torch.exp(torch.tanh(self.regressor(joint)))

    def l1(self) -> torch.Tensor:
        """Σ|W| over every Linear weight (no biases): the official L1 regulariser."""
        return sum((m.weight.abs().sum() for m in self.modules() if isinstance(m, nn.Linear)), torch.zeros(()))


class GlobalScale(nn.Module):
    """σ = g / (g_RGB + g_point), g = ½(tanh θ + 1), θ ∈ ℝ^{2×1} initialised at 0 (σ starts at ½, ½)."""

    def __init__(self) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(2, 1))

    def forward(self) -> torch.Tensor:
        g = 0.5 * (torch.tanh(self.theta[:, 0]) + 1.0)
        return g / g.sum()


def unified_score(sigma: torch.Tensor, weights: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
    """l = Σ_m σ_m · w_m · s_m over the last axis (weights and distances (…, 2), σ (2,))."""
    return (sigma.to(distances.dtype) * weights * distances).sum(dim=-1)


def pair_score(
    network: LSPN,
    sigma: torch.Tensor,
    features: torch.Tensor,
    prototypes: torch.Tensor,
    split: int,
    mu: torch.Tensor,
    background: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(l, w, s) of rank-paired (feature, prototype) rows; ``background`` rows get w = 1 (official scoring)."""
    distances = modality_distances(features, prototypes, split, mu)
    weights = network(direction(features, prototypes), prototypes).to(distances.dtype)
    if background is not None:
        weights = torch.where(background.unsqueeze(-1), torch.ones_like(weights), weights)
    return unified_score(sigma, weights, distances), weights, distances


#: The LSPN's output range, for the losses that push it to its ends.
W_MAX = math.e
