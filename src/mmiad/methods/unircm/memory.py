"""Uni-RCM's training-step memory, estimated from the shapes before training starts (the preflight).

The estimate is what autograd keeps for backward, *counted* rather than guessed: a probe runs the real networks
and the real loss on a tiny 4×4 grid (same hidden size, blocks, branches and channels) for one and two images,
and a ``saved_tensors_hooks`` pack hook adds up the distinct storages autograd saves. Every activation of the
networks has one row per grid cell, so the counts scale exactly with the number of cells (G²/16); the one-image
and two-image probes separate the per-image part from the per-forward part (the learnable reference, normalised
once per forward, is shared by a micro-batch). On top of that:

* parameters, their gradients and Adam's two moments: 4 × the parameter bytes of both networks;
* the transient buffers of the backward pass (gradients of the activations in flight), modelled as
  :data:`TRANSIENT_WIDTHS` activations of the widest layer per image — measured against ``VmHWM``, see
  BENCHMARKS.md (``python -m mmiad.bench memory``) for the accuracy;
* with activation checkpointing, only the block inputs stay saved, plus one block's activations while it is
  recomputed.

Following the architecture in :mod:`mmiad.methods.unircm.blocks` automatically is the point of probing instead of
writing the count by hand: a change there changes the estimate with it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from mmiad.methods.unircm.blocks import RefGuidedMapping
from mmiad.methods.unircm.config import UniRCMConfig
from mmiad.utils.budget import MemoryEstimateWarning, MicroBatchPlan, plan_micro_batches, resolve_budget

PROBE_GRID = 4
# Activation-sized gradient buffers alive at the backward pass's peak, in units of the widest activation.
TRANSIENT_WIDTHS = 4.0
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


@dataclass
class _Saved:
    outside: float = 0.0
    blocks: list[float] | None = None


@contextmanager
def _count_saved(networks: list[RefGuidedMapping], saved: _Saved) -> Iterator[None]:
    """Add the bytes of each distinct storage autograd saves to ``saved`` (by block), parameters excluded."""
    exclude = {p.untyped_storage().data_ptr() for net in networks for p in net.parameters()}
    exclude |= {b.untyped_storage().data_ptr() for net in networks for b in net.buffers()}
    seen: set[int] = set()
    keep: list[torch.Tensor] = []  # holds every saved tensor so no storage address is reused during the probe
    blocks = [block for net in networks for block in getattr(net, "blocks", [])]
    saved.blocks = [0.0] * len(blocks)
    current: list[int | None] = [None]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer not in exclude and pointer not in seen:
            seen.add(pointer)
            keep.append(tensor)
            if current[0] is None:
                saved.outside += storage.nbytes()
            else:
                saved.blocks[current[0]] += storage.nbytes()  # type: ignore[index]
        return tensor

    handles = []
    for index, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(lambda *_, i=index: current.__setitem__(0, i)))
        handles.append(block.register_forward_hook(lambda *_: current.__setitem__(0, None)))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            yield
    finally:
        for handle in handles:
            handle.remove()


def _probe(networks: list[RefGuidedMapping], images: int, mse_weight: float) -> _Saved:
    from mmiad.methods.unircm.training import micro_batch_loss

    generator = torch.Generator().manual_seed(0)
    rows = PROBE_GRID * PROBE_GRID
    rows_2d = torch.randn(images, rows, networks[0].in_features, generator=generator)
    rows_3d = torch.randn(images, rows, networks[1].in_features, generator=generator)
    foreground = torch.ones(images, rows, dtype=torch.bool)  # worst case: every cell is foreground
    saved = _Saved()
    with _count_saved(networks, saved):
        micro_batch_loss(networks[0], networks[1], rows_2d, rows_3d, foreground, torch.tensor(1.0), mse_weight)
    return saved


def step_cost(map_to_3d: RefGuidedMapping, map_to_2d: RefGuidedMapping, *, checkpointing: bool = False) -> StepCost:
    """Estimated memory of a training step of these two networks (see the module docstring)."""
    shape = {"grid": PROBE_GRID, "num_blocks": len(getattr(map_to_3d, "blocks", [])), "branches": map_to_3d.branches}
    hidden = map_to_3d.embed.proj.out_features if map_to_3d.branches != "none" else 0
    if map_to_3d.branches != "none":
        shape["hidden"] = hidden
    else:
        shape.pop("num_blocks")
    with torch.random.fork_rng(devices=[]):
        probes = [
            RefGuidedMapping(map_to_3d.in_features, map_to_3d.out_features, **shape),
            RefGuidedMapping(map_to_2d.in_features, map_to_2d.out_features, **shape),
        ]
    one, two = _probe(probes, 1, 1.0), _probe(probes, 2, 1.0)
    scale = map_to_3d.grid**2 / PROBE_GRID**2
    if checkpointing and one.blocks:
        # Kept: everything outside the blocks, each block's input; transient: the largest block, recomputed.
        block_input = hidden * FLOAT_BYTES * PROBE_GRID**2
        kept_one = one.outside + len(one.blocks) * block_input + max(one.blocks)
        kept_two = two.outside + len(two.blocks) * 2 * block_input + max(two.blocks)  # type: ignore[arg-type]
    else:
        kept_one = one.outside + sum(one.blocks or [])
        kept_two = two.outside + sum(two.blocks or [])
    per_image_saved = (kept_two - kept_one) * scale
    per_forward_saved = max(kept_one * scale - per_image_saved, 0.0)
    widest = max(2 * hidden, map_to_3d.in_features, map_to_2d.in_features, map_to_3d.out_features)
    transient = TRANSIENT_WIDTHS * widest * FLOAT_BYTES * map_to_3d.grid**2
    inputs = (map_to_3d.in_features + map_to_2d.in_features + 1) * FLOAT_BYTES * map_to_3d.grid**2
    parameter_bytes = sum(p.numel() * p.element_size() for net in (map_to_3d, map_to_2d) for p in net.parameters())
    return StepCost(
        fixed_bytes=4 * parameter_bytes + per_forward_saved,
        per_image_bytes=per_image_saved + transient + inputs,
    )


def plan_training(
    map_to_3d: RefGuidedMapping,
    map_to_2d: RefGuidedMapping,
    *,
    batch_size: int,
    memory_budget_gb: float | None,
    micro_batch: int | None = None,
    checkpointing: bool = False,
) -> MicroBatchPlan:
    """The preflight: micro-batch size for ``batch_size`` within the budget, or a one-line refusal.

    Raises:
        mmiad.utils.budget.MemoryBudgetError: One image per micro-batch does not fit the budget.
    """
    device = next(map_to_3d.parameters()).device
    cost = step_cost(map_to_3d, map_to_2d, checkpointing=checkpointing)
    hint = "" if checkpointing else ", or set activation_checkpointing=true"
    return plan_micro_batches(
        batch_size,
        fixed_bytes=cost.fixed_bytes,
        per_image_bytes=cost.per_image_bytes,
        budget_bytes=resolve_budget(memory_budget_gb, device),
        micro_batch=micro_batch,
        what="Uni-RCM training",
        hint=f"{hint}, or lower hidden (--set hidden=...)",
    )


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
