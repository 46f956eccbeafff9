"""Uni-RCM's training objective and loop: both directions, foreground rows only, data-parallel under torchrun.

The loop works on a *store* of per-sample grids keyed by global sample index; under torchrun every rank holds only
the samples it owns (:func:`mmiad.utils.distributed.owned`) and all ranks walk the same global order, so the summed
gradients equal a single-process step over the whole batch.

A batch that does not fit the memory budget is split into micro-batches whose gradients are accumulated
(:mod:`mmiad.methods.unircm.memory` plans the split before training). The loss is a mean over the foreground
cells of the *whole* batch, so each micro-batch's loss is divided by the batch's foreground count (not by the
number of micro-batches): the accumulated gradients are the whole batch's. BatchNorm inside the blocks couples
the images of a batch; ``batch_norm="exact"`` (default) keeps whole-batch statistics and gradients
(:mod:`mmiad.methods.unircm.batchnorm`), ``"per_micro_batch"`` normalises each micro-batch on its own, as
gradient accumulation in the official code would, at no extra cost.

The networks' forward passes run under :func:`~mmiad.utils.compute.autocast` (``precision``); the loss is taken
in float32 on their outputs, so fp32 is the unchanged computation.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from mmiad.methods.unircm.batchnorm import StopForwardError, WholeBatchNorm
from mmiad.methods.unircm.blocks import RefGuidedMapping
from mmiad.methods.unircm.resume import TrainingCheckpoint
from mmiad.utils import distributed as ddp
from mmiad.utils.budget import MicroBatchPlan, split_batch
from mmiad.utils.compute import autocast

# (G·G × C2 2D rows, G·G × C3 3D rows, G·G bool foreground) of one sample.
Grids = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

# Above this, λ·(mean square of the target features) outweighs the largest possible cosine term (2) at the start.
MSE_DOMINANCE = 2.0
BATCH_NORM_MODES = ("exact", "per_micro_batch")


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


def micro_batch_loss(
    map_to_3d: RefGuidedMapping,
    map_to_2d: RefGuidedMapping,
    rows_2d: torch.Tensor,
    rows_3d: torch.Tensor,
    foreground: torch.Tensor,
    total_rows: torch.Tensor,
    mse_weight: float,
    mse_scale: tuple[float, float] = (1.0, 1.0),
    precision: str = "fp32",
) -> torch.Tensor:
    """Both directions' loss on the foreground rows of a micro-batch, over the *batch's* foreground count.

    The networks run under ``precision``'s autocast, the loss in the rows' dtype.
    """
    with autocast(rows_2d.device, precision):
        predicted_3d, predicted_2d = map_to_3d(rows_2d), map_to_2d(rows_3d)
    predicted_3d, predicted_2d = predicted_3d.to(rows_3d.dtype), predicted_2d.to(rows_2d.dtype)
    return direction_loss(
        predicted_3d[foreground], rows_3d[foreground], total_rows, mse_weight, mse_scale[1]
    ) + direction_loss(predicted_2d[foreground], rows_2d[foreground], total_rows, mse_weight, mse_scale[0])


def _batch(store: Mapping[int, Grids], indices: list[int], template: Grids, device: torch.device) -> Grids:
    if indices:
        return tuple(torch.stack([store[i][part] for i in indices]).to(device) for part in range(3))  # type: ignore[return-value]
    # A rank with no sample in this global batch still runs the step so the collectives stay in lockstep.
    return tuple(torch.zeros(0, *t.shape[1:], dtype=t.dtype, device=device) for t in template)  # type: ignore[return-value]


@contextmanager
def checkpointed_blocks(networks: Sequence[nn.Module]) -> Iterator[None]:
    """Recompute each reference-guided block in the backward pass instead of keeping its activations.

    Only the blocks' inputs stay saved (``torch.utils.checkpoint``, non-reentrant). Outside autograd (no
    gradients) the blocks run plainly.
    """
    blocks = [block for net in networks for block in getattr(net, "blocks", [])]
    for block in blocks:
        original = block.forward

        def forward(*args: torch.Tensor, _original: Callable[..., torch.Tensor] = original) -> torch.Tensor:
            if torch.is_grad_enabled():
                return checkpoint(_original, *args, use_reentrant=False)
            return _original(*args)

        block.forward = forward
    try:
        yield
    finally:
        for block in blocks:
            del block.forward


def _backward_once(loss: torch.Tensor, batch_norms: Sequence[nn.Module], recomputes: bool) -> None:
    """``loss.backward()``; a checkpoint's recomputed forward must not update the running statistics twice."""
    if not (recomputes and batch_norms):
        loss.backward()
        return
    buffers = [b for layer in batch_norms for b in layer.buffers()]
    kept = [b.clone() for b in buffers]
    loss.backward()
    with torch.no_grad():
        for buffer, value in zip(buffers, kept, strict=True):
            buffer.copy_(value)


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
    plan: MicroBatchPlan | None = None,
    batch_norm: str = "exact",
    checkpointing: bool | None = None,
    precision: str = "fp32",
    resume: TrainingCheckpoint | None = None,
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
        plan: Micro-batch plan (:func:`mmiad.methods.unircm.memory.plan_training`); None runs whole batches.
        batch_norm: ``exact`` or ``per_micro_batch`` statistics when a batch is split (see the module docstring).
        checkpointing: Recompute the blocks' activations in the backward pass (less memory, ~1/3 more time);
            None: as the plan says (off without a plan).
        precision: Autocast of the networks' forward passes (``fp32``: none).
        resume: Where the state is saved after every epoch and restored from at the start (see
            :mod:`mmiad.methods.unircm.resume`); None trains from scratch and saves nothing.
    """
    if batch_norm not in BATCH_NORM_MODES:
        raise ValueError(f"unknown batch_norm {batch_norm!r}; expected one of {BATCH_NORM_MODES}")
    networks = torch.nn.ModuleList([map_to_3d, map_to_2d]).train()
    device, dtype = next(networks.parameters()).device, next(networks.parameters()).dtype
    optimizer = torch.optim.Adam(networks.parameters(), lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    grid_rows = map_to_3d.grid * map_to_3d.grid
    template = (
        torch.zeros(1, grid_rows, map_to_3d.in_features),
        torch.zeros(1, grid_rows, map_to_2d.in_features),
        torch.zeros(1, grid_rows, dtype=torch.bool),
    )
    # Ranks plan on their own (their free memory differs); all use the smallest micro-batch so they take the same
    # path and run the same collectives.
    micro = min(ddp.all_gather_objects(plan.micro_batch if plan is not None else batch_size))
    if checkpointing is None:
        checkpointing = plan.checkpointing if plan is not None else False
    whole_batch_norm = WholeBatchNorm([map_to_3d, map_to_2d])

    def load(indices: list[int]) -> Grids:
        rows_2d, rows_3d, foreground = _batch(store, indices, template, device)
        return rows_2d.to(dtype), rows_3d.to(dtype), foreground  # stored float16 grids train in float32

    def load_part(parts: list[list[int]], part: int) -> Grids:
        return load(parts[part])

    history: list[float] = []
    start = 0
    if resume is not None:
        restored = resume.restore(networks, optimizer, generator, epochs=epochs)
        if restored is not None:
            start, history = min(restored[0], epochs), restored[1][:epochs]
    bar = tqdm(
        range(start, epochs), desc="train unircm", disable=not progress, leave=False, initial=start, total=epochs
    )
    with checkpointed_blocks([map_to_3d, map_to_2d]) if checkpointing else _nothing():
        for epoch in bar:
            order = [kept[i] for i in torch.randperm(len(kept), generator=generator).tolist()]
            losses = []
            for start in range(0, len(order), batch_size):
                local = [i for i in order[start : start + batch_size] if i in store]
                # Every rank runs as many micro-batches as the busiest one (collectives stay in lockstep).
                parts = split_batch(local, max(1, math.ceil(max(ddp.all_gather_objects(len(local))) / micro)))
                count = sum(int(foreground_of(store, i).sum()) for i in local)
                total = ddp.all_reduce_sum(torch.tensor(float(count), dtype=torch.float64, device=device))
                total = total.to(torch.float32)
                if float(total) == 0:
                    continue
                optimizer.zero_grad()
                step_loss = _accumulate_step(
                    [map_to_3d, map_to_2d],
                    partial(load_part, parts),
                    parts,
                    total,
                    (mse_weight, mse_scale),
                    whole_batch_norm if batch_norm == "exact" else None,
                    checkpointing,
                    precision,
                )
                ddp.sum_gradients(networks)
                global_loss = float(ddp.all_reduce_sum(torch.tensor(step_loss, dtype=torch.float64, device=device)))
                if not np.isfinite(global_loss):
                    raise FloatingPointError("Uni-RCM training diverged (non-finite loss); try a lower learning rate")
                optimizer.step()
                losses.append(global_loss)
            history.append(float(np.mean(losses)) if losses else float("nan"))
            if resume is not None and ddp.is_main_process():
                resume.save(epoch + 1, networks, optimizer, generator, history)
    networks.eval()
    return history


def _accumulate_step(
    networks: list[RefGuidedMapping],
    load: Callable[[int], Grids],
    parts: list[list[int]],
    total: torch.Tensor,
    loss_weights: tuple[float, tuple[float, float]],
    whole_batch_norm: WholeBatchNorm | None,
    checkpointing: bool,
    precision: str = "fp32",
) -> float:
    """Accumulate one batch's gradients over its micro-batches; returns this rank's loss of the batch."""
    map_to_3d, map_to_2d = networks

    def loss_of(part: int) -> torch.Tensor:
        rows_2d, rows_3d, foreground = load(part)
        return micro_batch_loss(
            map_to_3d, map_to_2d, rows_2d, rows_3d, foreground, total, *loss_weights, precision=precision
        )

    if len(parts) > 1 and whole_batch_norm is not None and whole_batch_norm.layers:
        filled = [part for part, indices in enumerate(parts) if indices]

        def forward(position: int) -> None:
            rows_2d, rows_3d, _ = load(filled[position])
            for network, rows in ((map_to_3d, rows_2d), (map_to_2d, rows_3d)):
                with suppress(StopForwardError), autocast(rows.device, precision):
                    network(rows)

        return whole_batch_norm.step(len(filled), forward, lambda position: loss_of(filled[position]))
    batch_norms = [m for net in networks for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    step_loss = 0.0
    for part in range(len(parts)):
        loss = loss_of(part)
        _backward_once(loss, batch_norms, checkpointing)
        step_loss += float(loss.detach())
    return step_loss


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def foreground_of(store: Mapping[int, Grids], index: int) -> torch.Tensor:
    """A sample's foreground mask, without reading a spilled store's grids."""
    foreground = getattr(store, "foreground", None)
    return foreground(index) if foreground is not None else store[index][2]
