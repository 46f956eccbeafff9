"""The crossmodal feature-mapping network of CFM (and the per-pixel cosine objective it is trained with)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FeatureProjectionMLP(nn.Module):
    """Linear-GELU-Linear-GELU-Linear with hidden width (in+out)//2, as in CFM.

    Parameter names (``input``, ``projection``, ``output``) match the official checkpoints
    (``CFM_2Dto3D_<cls>_250ep_4bs.pth``), so their state dicts load directly.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        hidden = (in_features + out_features) // 2
        self.input = nn.Linear(in_features, hidden)
        self.projection = nn.Linear(hidden, hidden)
        self.output = nn.Linear(hidden, out_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Map (..., in_features) rows to (..., out_features)."""
        return self.output(F.gelu(self.projection(F.gelu(self.input(features)))))


def cosine_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 − mean cosine similarity over rows (eps 1e-6, as the official ``CosineSimilarity``)."""
    return 1.0 - F.cosine_similarity(predicted, target, dim=-1, eps=1e-6).mean()


def feature_discrepancy(predicted: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
    """Euclidean distance between L2-normalised predicted and observed features, per row.

    The official code calls it a cosine distance but computes this (equal to sqrt(2 − 2 cos)).
    """
    return torch.linalg.vector_norm(F.normalize(predicted, dim=-1) - F.normalize(observed, dim=-1), dim=-1)
