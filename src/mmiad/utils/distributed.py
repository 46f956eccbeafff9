"""Data-parallel helpers for training Uni-RCM under ``torchrun`` (gloo on CPU, NCCL on GPU).

The unified model trains on every category at once, which is where several GPUs pay off. The scheme keeps a
multi-process run *equivalent* to a single-process one with the same global batch:

* Samples are sharded once, deterministically: rank r owns the kept samples whose index i has i % world == r, so
  each rank extracts and stores only its share of the features.
* Every rank draws the same global permutation each epoch; a global batch is the same set of samples as in a
  single-process run, each rank processing the ones it owns.
* Losses are sums over the rank's foreground rows divided by the *global* row count, and gradients are summed
  across ranks, so the update equals the single-process one (up to floating-point summation order). BatchNorm
  statistics are synchronised by :class:`~mmiad.methods.unircm.blocks.GridBatchNorm`.
* Rank 0 fits the ORQ on the gathered features and broadcasts it; rank 0 writes the model file.

Without an initialised process group every helper degrades to the single-process behaviour.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of ranks (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Whether this process should write files and logs (rank 0)."""
    return rank() == 0


def init_from_env(backend: str | None = None) -> bool:
    """Initialise the process group from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT).

    Returns True when a group of more than one rank is (now) running; does nothing outside torchrun.
    """
    if dist.is_initialized():
        return is_distributed()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "RANK" not in os.environ:
        return False
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return is_distributed()


def owned(index: int) -> bool:
    """Whether this rank owns sample ``index`` (deterministic round-robin sharding)."""
    return index % world_size() == rank()


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum of a tensor over ranks (the tensor itself when not distributed); not differentiable."""
    if is_distributed():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def sum_gradients(module: nn.Module) -> None:
    """Sum every parameter's gradient over ranks (missing gradients count as zero, so all ranks take part)."""
    if not is_distributed():
        return
    for parameter in module.parameters():
        if not parameter.requires_grad:
            continue
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
        dist.all_reduce(parameter.grad, op=dist.ReduceOp.SUM)


def all_gather_objects(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order ([value] when not distributed)."""
    if not is_distributed():
        return [value]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def gather_to_main(value: Any) -> list[Any] | None:
    """Every rank's ``value`` on rank 0 (None elsewhere)."""
    if not is_distributed():
        return [value]
    gathered: list[Any] | None = [None] * world_size() if rank() == 0 else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def broadcast_from_main(value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    if not is_distributed():
        return value
    holder = [value if rank() == 0 else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def barrier() -> None:
    """Wait for every rank (a no-op in a single process), e.g. before rank 0's files are read by others."""
    if is_distributed():
        dist.barrier()
