"""Memory budgets for training: how much may be used, and how many images fit in one micro-batch.

Every method that trains with mini-batches (CFM, Uni-RCM, M3DM's UFF) keeps the meaning of its ``batch_size`` (the
images behind one optimiser step) on any machine by splitting a batch into *micro-batches* whose activations fit
the budget and accumulating their gradients. This module is the one place that turns a budget and a per-image cost
into a micro-batch size, refuses a budget that cannot hold even one image (one line naming the setting to change,
instead of being killed by the kernel), and warns when the plan comes close to the budget.

The budget is the memory training may *add* to the process as it is when the plan is made (the interpreter,
torch and the extractors are already there). ``None`` means 80 % of what is available: ``MemAvailable`` from
``/proc/meminfo`` (free RAM plus reclaimable caches) on CPU, the free memory of the device on CUDA.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

T = TypeVar("T")

GIB = 2**30
# Share of the available memory an automatic budget takes: the rest is headroom for the allocator's fragmentation,
# other processes and the estimate's error (see BENCHMARKS.md for its measured accuracy).
AUTO_FRACTION = 0.8
# A plan above this share of the budget is reported, so a user sees how close a run is before it starts.
CLOSE_FRACTION = 0.8
# What a training step costs beyond its tensors whatever its size: the allocator's retained pages, autograd's and
# OpenMP's threads. Measured: ~0.1-0.4 GB above the counted tensors at hidden 64 (BENCHMARKS.md, bench memory).
RUNTIME_OVERHEAD_BYTES = 256 * 2**20


class MemoryBudgetError(ValueError):
    """Training cannot fit the memory budget even with one image per micro-batch (the message is one line)."""


class MemoryEstimateWarning(UserWarning):
    """The estimated peak of a training step is close to the memory budget."""


def available_ram_bytes() -> int:
    """RAM available to a new allocation without swapping: ``MemAvailable``, else free pages × page size.

    ``MemAvailable`` counts reclaimable page cache as available (the kernel drops it under pressure), which free
    pages alone would not; the ``sysconf`` fallback (no ``/proc``) is therefore conservative.
    """
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # kB
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # no sysconf name on this platform
        return 4 * GIB


def available_bytes(device: torch.device | str) -> int:
    """Free memory where tensors of ``device`` live: GPU memory for CUDA, RAM otherwise."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return available_ram_bytes()


def resolve_budget(budget_gb: float | None, device: torch.device | str = "cpu") -> float:
    """The budget in bytes: the given GiB, or :data:`AUTO_FRACTION` of what ``device`` has available."""
    if budget_gb is None:
        return AUTO_FRACTION * available_bytes(device)
    if budget_gb < 0:
        raise ValueError(f"the memory budget must be non-negative, got {budget_gb} GB")
    return float(budget_gb) * GIB


@dataclass(frozen=True)
class MicroBatchPlan:
    """How one optimiser step is run within a budget.

    Attributes:
        batch_size: Images per optimiser step (the method's ``batch_size``; unchanged by the plan).
        micro_batch: Images per forward/backward pass (≤ ``batch_size``).
        fixed_bytes: Estimated memory the step needs whatever the micro-batch (parameters, gradients, optimiser
            state).
        per_image_bytes: Estimated extra peak memory per image of a micro-batch (activations kept for backward
            plus the transient buffers of the backward pass).
        budget_bytes: The budget the plan was made for.
        checkpointing: Whether the estimate assumes activation checkpointing (recomputing activations in the
            backward pass instead of keeping them).
    """

    batch_size: int
    micro_batch: int
    fixed_bytes: float
    per_image_bytes: float
    budget_bytes: float
    checkpointing: bool = False

    @property
    def peak_bytes(self) -> float:
        """Estimated peak of one training step."""
        return self.fixed_bytes + self.micro_batch * self.per_image_bytes

    @property
    def spare_bytes(self) -> float:
        """What the budget leaves after the step (for stored training features)."""
        return max(0.0, self.budget_bytes - self.peak_bytes)

    def describe(self) -> str:
        """One line: the estimate, the budget and the split."""
        return (
            f"estimated training peak {self.peak_bytes / GIB:.2f} GB of a {self.budget_bytes / GIB:.2f} GB budget "
            f"({self.micro_batch} of {self.batch_size} images per micro-batch"
            f"{', activation checkpointing' if self.checkpointing else ''})"
        )


def plan_micro_batches(
    batch_size: int,
    *,
    fixed_bytes: float,
    per_image_bytes: float,
    budget_bytes: float,
    micro_batch: int | None = None,
    what: str = "training",
    setting: str = "memory_budget_gb (--memory-budget-gb)",
    hint: str = "",
    checkpointing: bool = False,
    warn: bool = True,
) -> MicroBatchPlan:
    """The largest micro-batch (≤ ``batch_size``) whose estimated peak fits ``budget_bytes``.

    Args:
        batch_size: Images per optimiser step.
        fixed_bytes: Memory the step needs whatever the micro-batch.
        per_image_bytes: Extra memory per image of a micro-batch.
        budget_bytes: The budget (see :func:`resolve_budget`).
        micro_batch: Force this micro-batch size instead of choosing it (still checked against the budget).
        what: What is being planned, for the messages (e.g. ``Uni-RCM training``).
        setting: The setting a user changes to give training more memory, named in the refusal.
        hint: Further ways out, appended to the refusal (e.g. other settings that shrink the model).
        checkpointing: Recorded in the plan (the costs given already assume it or not).
        warn: Warn (:class:`MemoryEstimateWarning`) when the plan is close to the budget; see :func:`warn_if_close`.

    Raises:
        MemoryBudgetError: Even one image per micro-batch exceeds the budget (or the forced size does).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    fits = int((budget_bytes - fixed_bytes) // per_image_bytes) if per_image_bytes > 0 else batch_size
    chosen = min(batch_size, fits) if micro_batch is None else min(micro_batch, batch_size)
    if chosen < 1 or fixed_bytes + chosen * per_image_bytes > budget_bytes:
        need = fixed_bytes + max(chosen, 1) * per_image_bytes
        raise MemoryBudgetError(
            f"{what} needs about {need / GIB:.2f} GB for {max(chosen, 1)} image(s) per micro-batch but the "
            f"memory budget is {budget_bytes / GIB:.2f} GB: raise {setting}{hint}"
        )
    plan = MicroBatchPlan(
        batch_size, chosen, float(fixed_bytes), float(per_image_bytes), float(budget_bytes), checkpointing
    )
    if warn:
        warn_if_close(plan, what)
    return plan


def warn_if_close(plan: MicroBatchPlan, what: str) -> None:
    """Report the estimate when it is above :data:`CLOSE_FRACTION` of the budget."""
    if plan.peak_bytes > CLOSE_FRACTION * plan.budget_bytes:
        warnings.warn(f"{what}: {plan.describe()}", MemoryEstimateWarning, stacklevel=3)


def split_batch(items: Sequence[T], parts: int) -> list[list[T]]:
    """``items`` in ``parts`` consecutive, nearly equal chunks (the first ones one longer; some may be empty).

    Every data-parallel rank splits its share of a global batch into the *same* number of parts, so collectives
    inside the forward pass (synchronised BatchNorm) stay in lockstep even where a rank owns fewer images.
    """
    base, extra = divmod(len(items), parts)
    chunks, start = [], 0
    for part in range(parts):
        size = base + (part < extra)
        chunks.append(list(items[start : start + size]))
        start += size
    return chunks


@dataclass
class SavedBytes:
    """Bytes autograd saved for backward during a probe: outside any region, and inside each region."""

    outside: float = 0.0
    regions: list[float] = field(default_factory=list)

    @property
    def total(self) -> float:
        """Everything saved."""
        return self.outside + sum(self.regions)


@contextmanager
def count_saved_bytes(modules: Sequence[nn.Module], regions: Sequence[nn.Module] = ()) -> Iterator[SavedBytes]:
    """Count the distinct storages autograd saves for backward inside the ``with`` block.

    The count is of what a training step *keeps* between its forward and backward passes, measured rather than
    derived by hand, so it follows the architecture. Parameters and buffers of ``modules`` are excluded (they are
    counted once, not per image); a storage saved by several operations (a layer's input that is also another's)
    is counted once. Bytes saved while a module of ``regions`` runs are attributed to it, for estimates with
    activation checkpointing.
    """
    exclude = {t.untyped_storage().data_ptr() for m in modules for t in [*m.parameters(), *m.buffers()]}
    seen: set[int] = set()
    keep: list[torch.Tensor] = []  # holds every saved tensor so no storage address is reused during the probe
    saved = SavedBytes(regions=[0.0] * len(regions))
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
                saved.regions[current[0]] += storage.nbytes()
        return tensor

    handles = []
    for index, region in enumerate(regions):
        handles.append(region.register_forward_pre_hook(lambda *_, i=index: current.__setitem__(0, i)))
        handles.append(region.register_forward_hook(lambda *_: current.__setitem__(0, None)))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            yield saved
    finally:
        for handle in handles:
            handle.remove()
