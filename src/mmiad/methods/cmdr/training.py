"""CMDR-IAD's training step and its memory preflight.

The official ``train.py`` trains four networks side by side, each with its own loss and its own Adam (the
"independent optimisation strategy"): the two mappers predict the other modality, the two decoders reconstruct their
own. Every loss is 1 − the mean cosine similarity over the foreground tokens of the *3D* mask, also for the two 2D
losses. A module whose loss is not finite skips that step, as the official ``if torch.isfinite(loss)``.

The mappers are token-wise (their LayerNorms and dropout act per token), so they run on the foreground tokens only:
the loss and its gradient are those of the official full-grid forward, at a fraction of the cost. The decoders mix
tokens (attention chunks, convolutions, Decoder3D's token-axis Linear, BatchNorm statistics) and see the whole grid.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from mmiad.methods.cmdr.networks import build_networks
from mmiad.utils.budget import RUNTIME_OVERHEAD_BYTES, MicroBatchPlan, count_saved_bytes, plan_micro_batches
from mmiad.utils.budget import resolve_budget as resolve_budget_bytes
from mmiad.utils.compute import autocast

#: Which networks each modality trains and scores with.
NETWORKS_OF = {
    "both": ("map2Dto3D", "map3Dto2D", "Dec2D", "Dec3D"),
    "rgb": ("Dec2D",),
    "xyz": ("Dec3D",),
}
LOSS_EPS = 1e-6
# Measured peak / counted saved bytes (the allocator's slack, as CFM's preflight).
CALIBRATION = 1.15
_PROBE_GRIDS = (8, 16)


def masked_cosine_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 − mean over rows of the dot product of the rows L2-normalised with eps 1e-6 (``masked_similarity_loss``).

    The rows are the foreground tokens already; the loss is taken in float32 whatever the autocast produced.
    """
    predicted = F.normalize(predicted.float(), dim=-1, eps=LOSS_EPS)
    target = F.normalize(target.float(), dim=-1, eps=LOSS_EPS)
    return 1.0 - (predicted * target).sum(dim=-1).mean()


def predictions(
    networks: Mapping[str, nn.Module], tokens_2d: torch.Tensor, tokens_3d: torch.Tensor, foreground: torch.Tensor
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(prediction, target) on the foreground tokens for each network present.

    Args:
        networks: Some of ``map2Dto3D``, ``map3Dto2D``, ``Dec2D``, ``Dec3D``.
        tokens_2d: (N, C2) 2D tokens in raster order.
        tokens_3d: (N, C3) 3D tokens.
        foreground: (N,) bool, the 3D-feature mask (the official ``~xyz_mask``).
    """
    rows_2d, rows_3d = tokens_2d[foreground], tokens_3d[foreground]
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if "map2Dto3D" in networks:
        out["map2Dto3D"] = (networks["map2Dto3D"](rows_2d), rows_3d)
    if "map3Dto2D" in networks:
        out["map3Dto2D"] = (networks["map3Dto2D"](rows_3d), rows_2d)
    if "Dec2D" in networks:
        out["Dec2D"] = (networks["Dec2D"](tokens_2d[None])[0][foreground], rows_2d)
    if "Dec3D" in networks:
        out["Dec3D"] = (networks["Dec3D"](tokens_3d[None])[0][foreground], rows_3d)
    return out


def train_step(
    networks: Mapping[str, nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer],
    tokens_2d: torch.Tensor,
    tokens_3d: torch.Tensor,
    foreground: torch.Tensor,
    precision: str = "fp32",
) -> dict[str, float]:
    """One sample's step for every network: its own loss, backward and Adam step; returns the finite losses.

    A sample without a foreground token teaches nothing and is skipped (the official loss would be a constant 0
    without a graph, which fails in ``backward``).
    """
    if not bool(foreground.any()):
        return {}
    device = tokens_2d.device
    for optimizer in optimizers.values():
        optimizer.zero_grad(set_to_none=True)
    with autocast(device, precision):
        pairs = predictions(networks, tokens_2d, tokens_3d, foreground)
    losses: dict[str, float] = {}
    for name, (predicted, target) in pairs.items():
        loss = masked_cosine_loss(predicted, target)
        if not torch.isfinite(loss):
            continue
        loss.backward()
        optimizers[name].step()
        losses[name] = float(loss.detach())
    return losses


def _saved_bytes(channels: tuple[int, int], grid: int, names: tuple[str, ...]) -> float:
    """Bytes one training step at ``grid`` keeps for backward (probe networks of the same widths, random tokens)."""
    networks = {k: v for k, v in build_networks(*channels, grid).items() if k in names}
    generator = torch.Generator().manual_seed(0)
    tokens_2d = torch.randn(grid * grid, channels[0], generator=generator)
    tokens_3d = torch.randn(grid * grid, channels[1], generator=generator)
    foreground = torch.ones(grid * grid, dtype=torch.bool)
    with count_saved_bytes(list(networks.values())) as saved:
        for predicted, target in predictions(networks, tokens_2d, tokens_3d, foreground).values():
            masked_cosine_loss(predicted, target)
    return saved.total


def plan_training(
    networks: Mapping[str, nn.Module], channels: tuple[int, int], grid: int, memory_budget_gb: float | None
) -> MicroBatchPlan:
    """The preflight: one sample's step (batch 1, as the official code) must fit the budget.

    What a step keeps for backward grows linearly with the token count (every activation is per token or a fixed
    fraction of the tokens), so it is counted on two small probe grids and extrapolated to ``grid``; parameters,
    gradients and Adam's two moments count four times the parameters (Decoder3D alone is 88 M parameters at 224²).

    Raises:
        mmiad.utils.budget.MemoryBudgetError: The step does not fit.
    """
    names = tuple(networks)
    small, large = (_saved_bytes(channels, g, names) for g in _PROBE_GRIDS)
    tokens_small, tokens_large = (g * g for g in _PROBE_GRIDS)
    per_token = max(0.0, (large - small) / (tokens_large - tokens_small))
    saved = small + per_token * (grid * grid - tokens_small)
    features = 4.0 * grid * grid * sum(channels)  # the sample's tokens themselves
    parameters = sum(p.numel() * p.element_size() for net in networks.values() for p in net.parameters())
    device = next(iter(networks.values())).parameters().__next__().device
    return plan_micro_batches(
        1,
        fixed_bytes=4 * parameters + RUNTIME_OVERHEAD_BYTES,
        per_image_bytes=CALIBRATION * saved + features,
        budget_bytes=resolve_budget_bytes(memory_budget_gb, device),
        what="CMDR-IAD training",
        hint=", or lower grid_size (--grid-size): Decoder3D grows with the square of the grid's token count",
    )
