"""CFM's training step within a memory budget: micro-batches of images with gradient accumulation.

CFM's loss is, per direction, one minus the mean cosine similarity over the foreground pixels of *all* images of a
batch. A micro-batch's loss is therefore weighted by its share of the batch's foreground pixels (not by one over
the number of micro-batches), so the accumulated gradients are the whole batch's. The MLPs work per pixel (no
BatchNorm), so nothing else couples the images.

The step runs where the networks' parameters are (``--device``), with the two MLPs under
:func:`~mmiad.utils.compute.autocast` (``--precision``); the cosine loss is taken in the rows' dtype (float32),
so fp32 is the unchanged computation and bf16/fp16 change only the matrix products.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from mmiad.methods.cfm.mapping import cosine_loss
from mmiad.utils.budget import (
    RUNTIME_OVERHEAD_BYTES,
    MicroBatchPlan,
    count_saved_bytes,
    plan_micro_batches,
    resolve_budget,
    split_batch,
)
from mmiad.utils.compute import autocast

# Measured peak / counted saved bytes per image (see mmiad.methods.unircm.memory; the same allocator slack).
CALIBRATION = 1.15
_PROBE_ROWS = 64

Rows = tuple[torch.Tensor, torch.Tensor]  # one image's foreground (2D rows, 3D rows)


def plan_cfm_training(
    map_to_3d: nn.Module,
    map_to_2d: nn.Module,
    inputs: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    *,
    channels: tuple[int, int],
    rows_per_image: int,
    batch_size: int,
    memory_budget_gb: float | None,
    micro_batch: int | None = None,
) -> MicroBatchPlan:
    """The preflight of CFM training: how many images per micro-batch fit the budget.

    Args:
        map_to_3d: The network predicting 3D features.
        map_to_2d: The network predicting 2D features.
        inputs: What each network reads, from (2D rows, 3D rows) (crossmodal or intramodal).
        channels: 2D and 3D feature widths.
        rows_per_image: Most foreground pixels an image can have (the grid's cell count).
        batch_size: Images per optimiser step.
        memory_budget_gb: The budget (None: automatic, see :func:`mmiad.utils.budget.resolve_budget`).
        micro_batch: Force this many images per micro-batch.

    Raises:
        mmiad.utils.budget.MemoryBudgetError: One image per micro-batch does not fit.
    """
    generator = torch.Generator().manual_seed(0)
    parameter = next(map_to_3d.parameters())
    dtype, device = parameter.dtype, parameter.device
    rows_2d = torch.randn(_PROBE_ROWS, channels[0], generator=generator).to(device=device, dtype=dtype)
    rows_3d = torch.randn(_PROBE_ROWS, channels[1], generator=generator).to(device=device, dtype=dtype)
    with count_saved_bytes([map_to_3d, map_to_2d]) as saved:
        source_3d, source_2d = inputs(rows_2d, rows_3d)
        cosine_loss(map_to_3d(source_3d), rows_3d) + cosine_loss(map_to_2d(source_2d), rows_2d)
    per_row = saved.total / _PROBE_ROWS + dtype.itemsize * sum(channels)  # the rows themselves, stacked for the step
    parameters = sum(p.numel() * p.element_size() for net in (map_to_3d, map_to_2d) for p in net.parameters())
    return plan_micro_batches(
        batch_size,
        fixed_bytes=4 * parameters + RUNTIME_OVERHEAD_BYTES,  # parameters, gradients, Adam's two moments
        per_image_bytes=CALIBRATION * per_row * rows_per_image,
        budget_bytes=resolve_budget(memory_budget_gb, device),
        micro_batch=micro_batch,
        what="CFM training",
        hint=", or lower grid_size (--grid-size)",
    )


def accumulate_batch(
    map_to_3d: nn.Module,
    map_to_2d: nn.Module,
    inputs: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    batch: Sequence[Rows],
    micro_batch: int,
    precision: str = "fp32",
) -> float:
    """Forward and backward one batch in micro-batches of ``micro_batch`` images; returns the batch loss.

    The rows may live anywhere: each micro-batch is moved to the networks' device. The caller zeroes the
    gradients before and steps the optimiser after.
    """
    device = next(map_to_3d.parameters()).device
    total = sum(rows_2d.shape[0] for rows_2d, _ in batch)
    batch_loss = 0.0
    for part in split_batch(list(batch), -(-len(batch) // micro_batch)):
        features_2d = torch.cat([rows_2d for rows_2d, _ in part]).to(device)
        features_3d = torch.cat([rows_3d for _, rows_3d in part]).to(device)
        if features_2d.shape[0] == 0:
            continue
        source_3d, source_2d = inputs(features_2d, features_3d)
        share = features_2d.shape[0] / total
        with autocast(device, precision):
            predicted_3d, predicted_2d = map_to_3d(source_3d), map_to_2d(source_2d)
        loss = share * (
            cosine_loss(predicted_3d.to(features_3d.dtype), features_3d)
            + cosine_loss(predicted_2d.to(features_2d.dtype), features_2d)
        )
        if not torch.isfinite(loss):
            raise FloatingPointError("CFM training diverged (non-finite loss); try a lower learning rate")
        loss.backward()
        batch_loss += float(loss.detach())
    return batch_loss


def subset_generator(seed: int) -> torch.Generator:
    """The generator of ``pixel_subset``'s draws: its own, so the epoch shuffles stay those of a full run."""
    return torch.Generator().manual_seed(seed)


def sample_pixels(batch: Sequence[Rows], fraction: float, generator: torch.Generator) -> list[Rows]:
    """Each image's foreground rows reduced to ``round(fraction · n)`` (at least one), drawn without replacement.

    Why: on a CPU the step's cost is proportional to the foreground pixels, and neighbouring pixels carry nearly
    the same (2D, 3D) pair, so a random share of them per step gives most of the signal for a fraction of the
    cost. Not in the official code (it trains on every foreground pixel); the draws come from ``generator``
    (see :func:`subset_generator`), one per image in batch order, so a run is reproducible (``pixel_subset``).
    The kept rows stay in their raster order.
    """
    sampled = []
    for rows_2d, rows_3d in batch:
        count = rows_2d.shape[0]
        keep = torch.randperm(count, generator=generator)[: max(1, round(fraction * count))].sort().values
        keep = keep.to(rows_2d.device)
        sampled.append((rows_2d[keep], rows_3d[keep]))
    return sampled
