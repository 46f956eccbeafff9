"""Uni-RCM's training-step memory, estimated from the shapes before training starts (the preflight).

The estimate is what autograd keeps for backward, *counted* rather than guessed: a probe runs the real networks
and the real loss on a tiny 4×4 grid (same hidden size, blocks, branches and channels) for one and two images,
and a ``saved_tensors_hooks`` pack hook adds up the distinct storages autograd saves. Every activation of the
networks has one row per grid cell, so the counts scale exactly with the number of cells (G²/16); the one-image
and two-image probes separate the per-image part from the per-forward part (the learnable reference, normalised
once per forward, is shared by a micro-batch). On top of that:

* parameters, their gradients and Adam's two moments: 4 × the parameter bytes of both networks;
* a constant runtime overhead (:data:`mmiad.utils.budget.RUNTIME_OVERHEAD_BYTES`);
* with activation checkpointing, only the block inputs stay saved, plus one block's activations while it is
  recomputed;
* the transient buffers (gradients in flight, a forward's not-yet-freed intermediates, the allocator's slack),
  which the count cannot see: the per-image part is multiplied by :data:`CALIBRATION`, measured against
  ``VmHWM`` at hidden 64 and 256 (``python -m mmiad.bench memory``; BENCHMARKS.md states the accuracy at other
  sizes). Checkpointing's factor is larger because a recomputed block's intermediates and gradients are a
  larger share of what it keeps.

Following the architecture in :mod:`mmiad.methods.unircm.blocks` automatically is the point of probing instead of
writing the count by hand: a change there changes the estimate with it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from mmiad.methods.unircm.blocks import RefGuidedMapping
from mmiad.methods.unircm.config import UniRCMConfig
from mmiad.utils.budget import (
    RUNTIME_OVERHEAD_BYTES,
    MemoryBudgetError,
    MemoryEstimateWarning,
    MicroBatchPlan,
    SavedBytes,
    count_saved_bytes,
    plan_micro_batches,
    resolve_budget,
    warn_if_close,
)

PROBE_GRID = 4
# Measured peak / counted saved bytes per image (plain, checkpointed): see the module docstring.
CALIBRATION = {False: 1.15, True: 2.4}
FLOAT_BYTES = 4


@dataclass(frozen=True)
class StepCost:
    """Estimated memory of one Uni-RCM training step.

    Attributes:
        fixed_bytes: Whatever the micro-batch: parameters, gradients, Adam state, per-forward activations.
        per_image_bytes: Extra per image of a micro-batch.
    """

    fixed_bytes: float
    per_image_bytes: float


def _probe(networks: list[RefGuidedMapping], images: int, mse_weight: float) -> SavedBytes:
    from mmiad.methods.unircm.training import micro_batch_loss

    generator = torch.Generator().manual_seed(0)
    rows = PROBE_GRID * PROBE_GRID
    rows_2d = torch.randn(images, rows, networks[0].in_features, generator=generator)
    rows_3d = torch.randn(images, rows, networks[1].in_features, generator=generator)
    foreground = torch.ones(images, rows, dtype=torch.bool)  # worst case: every cell is foreground
    blocks = [block for net in networks for block in getattr(net, "blocks", [])]
    with count_saved_bytes(networks, blocks) as saved:
        micro_batch_loss(networks[0], networks[1], rows_2d, rows_3d, foreground, torch.tensor(1.0), mse_weight)
    return saved


def step_cost(map_to_3d: RefGuidedMapping, map_to_2d: RefGuidedMapping, *, checkpointing: bool = False) -> StepCost:
    """Estimated memory of a training step of these two networks (see the module docstring)."""
    branches, num_blocks = map_to_3d.branches, len(getattr(map_to_3d, "blocks", []))
    hidden = map_to_3d.feat_embed.proj.out_features if branches != "none" else 0

    def probe(in_features: int, out_features: int) -> RefGuidedMapping:
        if branches == "none":  # no blocks: hidden size and block count do not apply
            return RefGuidedMapping(in_features, out_features, grid=PROBE_GRID, branches=branches)
        return RefGuidedMapping(
            in_features, out_features, hidden=hidden, grid=PROBE_GRID, num_blocks=num_blocks, branches=branches
        )

    with torch.random.fork_rng(devices=[]):
        probes = [
            probe(map_to_3d.in_features, map_to_3d.out_features),
            probe(map_to_2d.in_features, map_to_2d.out_features),
        ]
    one, two = _probe(probes, 1, 1.0), _probe(probes, 2, 1.0)
    scale = map_to_3d.grid**2 / PROBE_GRID**2
    if checkpointing and one.regions:
        # Kept: everything outside the blocks, each block's input; transient: the largest block, recomputed.
        block_input = hidden * FLOAT_BYTES * PROBE_GRID**2
        kept_one = one.outside + len(one.regions) * block_input + max(one.regions)
        kept_two = two.outside + len(two.regions) * 2 * block_input + max(two.regions)
    else:
        kept_one, kept_two = one.total, two.total
    per_image_saved = (kept_two - kept_one) * scale
    per_forward_saved = max(kept_one * scale - per_image_saved, 0.0)
    inputs = (map_to_3d.in_features + map_to_2d.in_features + 1) * FLOAT_BYTES * map_to_3d.grid**2
    parameter_bytes = sum(p.numel() * p.element_size() for net in (map_to_3d, map_to_2d) for p in net.parameters())
    return StepCost(
        fixed_bytes=4 * parameter_bytes + per_forward_saved + RUNTIME_OVERHEAD_BYTES,
        per_image_bytes=CALIBRATION[checkpointing] * (per_image_saved + inputs),
    )


def plan_training(
    map_to_3d: RefGuidedMapping,
    map_to_2d: RefGuidedMapping,
    *,
    batch_size: int,
    memory_budget_gb: float | None,
    micro_batch: int | None = None,
    checkpointing: bool | None = None,
) -> MicroBatchPlan:
    """The preflight: micro-batch size (and checkpointing) for ``batch_size`` within the budget, or a refusal.

    With ``checkpointing=None`` (automatic) the plan prefers, in order: the whole batch without checkpointing;
    the whole batch with checkpointing (about a third more compute, and BatchNorm stays whole-batch for free);
    micro-batches without checkpointing; micro-batches with it (when not even one image fits otherwise).

    Raises:
        mmiad.utils.budget.MemoryBudgetError: One image per micro-batch does not fit the budget.
    """
    device = next(map_to_3d.parameters()).device
    budget = resolve_budget(memory_budget_gb, device)
    plans, refusal = [], None
    for option in (False, True) if checkpointing is None else (checkpointing,):
        cost = step_cost(map_to_3d, map_to_2d, checkpointing=option)
        hint = "" if option else ", or set activation_checkpointing=true"
        try:
            plans.append(
                plan_micro_batches(
                    batch_size,
                    fixed_bytes=cost.fixed_bytes,
                    per_image_bytes=cost.per_image_bytes,
                    budget_bytes=budget,
                    micro_batch=micro_batch,
                    what="Uni-RCM training",
                    hint=f"{hint}, or lower hidden (--set hidden=...)",
                    checkpointing=option,
                    warn=False,
                )
            )
        except MemoryBudgetError as error:
            refusal = error
    if not plans:
        assert refusal is not None
        raise refusal
    whole = [plan for plan in plans if plan.micro_batch == batch_size]
    plan = (whole or plans)[0]
    warn_if_close(plan, "Uni-RCM training")
    return plan


def grid_store_budget(config: UniRCMConfig, channels_2d: int, channels_3d: int, device: torch.device) -> float:
    """RAM for the stored training grids: what the budget leaves after the training step (the preflight).

    One budget covers the whole training: on CPU the step (planned first: the paper's batch matters more than
    keeping every grid in RAM, spilled grids are read back bit-identically) and the grids share it. On CUDA the
    budget is the GPU's, and the grids get the automatic RAM budget.

    Raises:
        mmiad.utils.budget.MemoryBudgetError: The training step alone does not fit the budget.
    """
    shape = {"hidden": config.hidden, "grid": config.grid_size, "num_blocks": config.num_blocks}
    with torch.random.fork_rng(devices=[]):
        networks = [
            RefGuidedMapping(channels_2d, channels_3d, branches=config.branches, **shape).to(device),
            RefGuidedMapping(channels_3d, channels_2d, branches=config.branches, **shape).to(device),
        ]
    with warnings.catch_warnings():  # training itself reports a plan close to the budget
        warnings.simplefilter("ignore", MemoryEstimateWarning)
        plan = plan_training(*networks, **training_memory_options(config))
    return plan.spare_bytes if device.type == "cpu" else resolve_budget(None, "cpu")


def training_memory_options(config: UniRCMConfig) -> dict[str, Any]:
    """The keyword arguments of :func:`plan_training` that come from the configuration."""
    return {
        "batch_size": config.batch_size,
        "memory_budget_gb": config.memory_budget_gb,
        "micro_batch": config.micro_batch,
        "checkpointing": config.activation_checkpointing,
    }
