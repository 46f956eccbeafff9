"""Uni-RCM's training objective and loop: both directions, foreground rows only, data-parallel under torchrun.

The loop works on a *store* of per-sample grids keyed by global sample index; under torchrun every rank holds only
the samples it owns (:func:`mmiad.utils.distributed.owned`) and all ranks walk the same global order, so the summed
gradients equal a single-process step over the whole batch.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mmiad.methods.unircm.blocks import RefGuidedMapping
from mmiad.utils import distributed as ddp

# (G·G × C2 2D rows, G·G × C3 3D rows, G·G bool foreground) of one sample.
Grids = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

# Above this, λ·(mean square of the target features) outweighs the largest possible cosine term (2) at the start.
MSE_DOMINANCE = 2.0


def direction_loss(
    predicted: torch.Tensor,
    target: torch.Tensor,
    total_rows: torch.Tensor,
    mse_weight: float,
    mse_scale: float = 1.0,
) -> torch.Tensor:
    """Σ over rows of (1 − cos) + λ·mean-over-channels squared error / ``mse_scale``, over the *global* row count.

    With ``total_rows`` = this batch's row count and ``mse_scale`` 1 it equals CFM's ``cosine_loss`` +
    λ·``mse_loss``; dividing by the count over all ranks instead makes summed per-rank gradients equal the
    single-process gradient.
    """
    cosine = F.cosine_similarity(predicted, target, dim=-1, eps=1e-6)
    squared = ((predicted - target) ** 2).sum() / (target.shape[-1] * mse_scale)
    return ((1.0 - cosine).sum() + mse_weight * squared) / total_rows


def feature_mean_squares(store: Mapping[int, Grids]) -> tuple[float, float]:
    """Mean square of the foreground 2D and 3D feature values over all ranks' samples."""
    totals = torch.zeros(3, dtype=torch.float64)
    for rows_2d, rows_3d, foreground in store.values():
        totals[0] += rows_2d[foreground].double().pow(2).mean(dim=1).sum()
        totals[1] += rows_3d[foreground].double().pow(2).mean(dim=1).sum()
        totals[2] += foreground.sum()
    totals = ddp.all_reduce_sum(totals)
    count = max(float(totals[2]), 1.0)
    return float(totals[0]) / count, float(totals[1]) / count


def mse_scales(mean_squares: tuple[float, float], normalization: str, mse_weight: float) -> tuple[float, float]:
    """Divisors of the 2D and 3D squared errors; warns when the paper's raw MSE would swamp the cosine term."""
    if normalization == "feature_rms":
        return tuple(max(m, 1e-12) for m in mean_squares)  # type: ignore[return-value]
    heavy = [name for name, m in zip(("2D", "3D"), mean_squares, strict=True) if mse_weight * m > MSE_DOMINANCE]
    if heavy:
        warnings.warn(
            f"the {' and '.join(heavy)} features are large (mean squares {mean_squares[0]:.3g} / "
            f"{mean_squares[1]:.3g}), so λ·MSE dominates the cosine term the anomaly scores are made of; "
            "consider mse_normalization='feature_rms' (e.g. --set mse_normalization=feature_rms)",
            stacklevel=3,
        )
    return 1.0, 1.0


def _batch(store: Mapping[int, Grids], indices: list[int], template: Grids, device: torch.device) -> Grids:
    if indices:
        return tuple(torch.stack([store[i][part] for i in indices]).to(device) for part in range(3))  # type: ignore[return-value]
    # A rank with no sample in this global batch still runs the step so the collectives stay in lockstep.
    return tuple(torch.zeros(0, *t.shape[1:], dtype=t.dtype, device=device) for t in template)  # type: ignore[return-value]


def train_mappings(
    map_to_3d: RefGuidedMapping,
    map_to_2d: RefGuidedMapping,
    store: Mapping[int, Grids],
    kept: list[int],
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    mse_weight: float,
    mse_scale: tuple[float, float],
    seed: int,
    progress: bool = False,
) -> list[float]:
    """Adam on the joint loss of both directions over foreground rows; returns the mean loss per epoch.

    Args:
        map_to_3d: The 2D→3D network (trained in place).
        map_to_2d: The 3D→2D network (trained in place).
        store: This rank's grids, keyed by global sample index.
        kept: Every rank's sample indices, sorted (the global epoch order is a seeded permutation of it).
        epochs: Passes over ``kept``.
        batch_size: Samples per global step.
        learning_rate: Adam learning rate.
        mse_weight: λ.
        mse_scale: Divisors of the 2D and 3D squared errors (see :func:`mse_scales`).
        seed: Seed of the shuffling.
        progress: Show a progress bar.
    """
    networks = torch.nn.ModuleList([map_to_3d, map_to_2d]).train()
    device = next(networks.parameters()).device
    optimizer = torch.optim.Adam(networks.parameters(), lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    grid_rows = map_to_3d.grid * map_to_3d.grid
    template = (
        torch.zeros(1, grid_rows, map_to_3d.in_features),
        torch.zeros(1, grid_rows, map_to_2d.in_features),
        torch.zeros(1, grid_rows, dtype=torch.bool),
    )
    history: list[float] = []
    for _ in tqdm(range(epochs), desc="train unircm", disable=not progress, leave=False):
        order = [kept[i] for i in torch.randperm(len(kept), generator=generator).tolist()]
        losses = []
        for start in range(0, len(order), batch_size):
            local = [i for i in order[start : start + batch_size] if i in store]
            rows_2d, rows_3d, foreground = _batch(store, local, template, device)
            rows_2d, rows_3d = rows_2d.float(), rows_3d.float()
            total = ddp.all_reduce_sum(foreground.sum().to(torch.float64)).to(torch.float32)
            if float(total) == 0:
                continue
            predicted_3d, predicted_2d = map_to_3d(rows_2d), map_to_2d(rows_3d)
            loss = direction_loss(
                predicted_3d[foreground], rows_3d[foreground], total, mse_weight, mse_scale[1]
            ) + direction_loss(predicted_2d[foreground], rows_2d[foreground], total, mse_weight, mse_scale[0])
            optimizer.zero_grad()
            loss.backward()
            ddp.sum_gradients(networks)
            global_loss = float(ddp.all_reduce_sum(loss.detach()))
            if not np.isfinite(global_loss):
                raise FloatingPointError("Uni-RCM training diverged (non-finite loss); try a lower learning rate")
            optimizer.step()
            losses.append(global_loss)
        history.append(float(np.mean(losses)) if losses else float("nan"))
    networks.eval()
    return history
