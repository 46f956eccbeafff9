"""Whole-batch BatchNorm over micro-batches: the statistics *and* the gradients of one un-split batch.

Uni-RCM's RFI branch normalises its depthwise-convolved grid with BatchNorm in training mode, so every image of
a batch influences every other through the per-channel mean and variance, forwards and backwards. Gradient
accumulation alone would normalise each micro-batch by its own statistics (what accumulating in the official
code would do) and change the training. :class:`WholeBatchNorm` keeps it exact instead:

1. **Statistics.** For each BatchNorm depth ``k`` (the k-th BatchNorm of each network), every micro-batch runs
   forward without gradients up to that layer, using the already-known whole-batch statistics of the layers
   before it, and its per-channel sums are added up (float64). The forward stops at the layer.
2. **Backward reductions.** BatchNorm's exact input gradient needs two whole-batch sums of its output gradient,
   ``Σ dy`` and ``Σ dy·x̂``. They are gathered from the deepest layer to the first: every micro-batch runs
   forward and back-propagates only down to layer ``k`` (the deeper layers already use their whole-batch sums).
3. **The step.** Every micro-batch runs forward and backward with all statistics and sums known; the
   accumulated parameter gradients equal the whole batch's up to float rounding. The running statistics are
   updated once, with the whole batch's moments, as ``BatchNorm2d`` does.

With ``K`` BatchNorm layers per network this costs about ``K + 1`` forward/backward passes instead of one, plus
``K`` partial forward passes without gradients; it is used only when a batch does not fit the budget whole.
Under torchrun the sums are added over ranks, as :class:`~mmiad.methods.unircm.blocks.GridBatchNorm` does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from mmiad.utils import distributed as ddp


class StopForwardError(Exception):
    """Raised inside a network's forward once the statistics of the layer being measured are collected."""


class _FixedStatisticsNorm(torch.autograd.Function):
    """BatchNorm with given statistics whose input gradient uses given whole-batch sums of the output gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, invstd, sums):
        shape = (1, -1, 1, 1)
        normalised = (x - mean.view(shape)) * invstd.view(shape)
        ctx.save_for_backward(normalised, weight, invstd)
        ctx.sums = sums
        return normalised * weight.view(shape) + bias.view(shape)

    @staticmethod
    def backward(ctx, grad):
        normalised, weight, invstd = ctx.saved_tensors
        shape = (1, -1, 1, 1)
        grad_x = None
        if ctx.needs_input_grad[0]:
            if ctx.sums is None:
                raise RuntimeError("the whole-batch BatchNorm gradient sums of this layer are not known yet")
            sum_grad, sum_grad_normalised, count = ctx.sums
            grad_x = (weight * invstd).view(shape) * (
                grad - (sum_grad / count).view(shape) - normalised * (sum_grad_normalised / count).view(shape)
            )
        grad_weight = (grad * normalised).sum(dim=(0, 2, 3))
        return grad_x, grad_weight, grad.sum(dim=(0, 2, 3)), None, None, None


@dataclass
class _LayerState:
    """One BatchNorm layer's whole-batch quantities within a step."""

    sums: torch.Tensor | None = None  # float64 (Σx, Σx², n) being collected
    mean: torch.Tensor | None = None
    var: torch.Tensor | None = None
    count: float = 0.0
    grad_sums: tuple[torch.Tensor, torch.Tensor, float] | None = None


class WholeBatchNorm:
    """Drives the BatchNorm layers of ``networks`` through the three phases above, one optimiser step at a time.

    Args:
        networks: The networks trained together; their BatchNorm layers are grouped by depth (order of
            registration within each network, which is the order they run in).
    """

    def __init__(self, networks: Sequence[nn.Module]) -> None:
        per_network = [[m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] for net in networks]
        depth = max((len(layers) for layers in per_network), default=0)
        self.depths = [[layers[k] for layers in per_network if k < len(layers)] for k in range(depth)]
        self.layers = [layer for group in self.depths for layer in group]
        self._state: dict[nn.Module, _LayerState] = {}
        self._collect: set[nn.Module] = set()
        self._record: set[nn.Module] = set()
        self._outputs: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------ the replaced forward
    def _forward(self, layer: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
        state = self._state[layer]
        if layer in self._collect:
            with torch.no_grad():
                moments = torch.stack([x.double().sum(dim=(0, 2, 3)), x.double().pow(2).sum(dim=(0, 2, 3))])
                state.sums = moments if state.sums is None else state.sums + moments
                state.count += x.numel() / x.shape[1]
            raise StopForwardError
        # Outside the collect phase ``_finish_statistics`` has already set this layer's whole-batch moments.
        assert state.mean is not None and state.var is not None
        invstd = torch.rsqrt(state.var + layer.eps)
        y = _FixedStatisticsNorm.apply(x, layer.weight, layer.bias, state.mean, invstd, state.grad_sums)
        if layer in self._record and layer not in self._outputs:  # not again when a checkpoint recomputes
            normalised = (x.detach() - state.mean.view(1, -1, 1, 1)) * invstd.view(1, -1, 1, 1)
            self._outputs[layer] = (y, normalised)
        return y

    @contextmanager
    def _installed(self) -> Iterator[None]:
        for layer in self.layers:
            layer.forward = partial(self._forward, layer)  # type: ignore[method-assign]
        try:
            yield
        finally:
            for layer in self.layers:
                del layer.forward

    # ------------------------------------------------------------------ one step
    def step(
        self,
        count: int,
        forward: Callable[[int], None],
        loss_of: Callable[[int], torch.Tensor],
    ) -> float:
        """Run one optimiser step's forward/backward passes over ``count`` micro-batches; returns the summed loss.

        Args:
            count: Micro-batches of this step (on this rank).
            forward: ``forward(i)`` runs micro-batch ``i`` through every network without computing the loss
                (a network that raises :class:`StopForwardError` is simply cut short).
            loss_of: ``loss_of(i)``: micro-batch ``i``'s share of the batch loss (summing to the batch loss).
        """
        self._state = {layer: _LayerState() for layer in self.layers}
        with self._installed():
            for group in self.depths:  # 1. statistics, first layer to last
                self._collect = set(group)
                with torch.no_grad():
                    for i in range(count):
                        forward(i)
                self._collect = set()
                for layer in group:
                    self._finish_statistics(layer)
            for group in reversed(self.depths):  # 2. gradient sums, last layer to first
                self._record = set(group)
                totals = {
                    layer: torch.zeros(2, layer.num_features, dtype=torch.float64, device=layer.weight.device)
                    for layer in group
                }
                for i in range(count):
                    self._outputs = {}
                    loss = loss_of(i)
                    recorded = [layer for layer in group if layer in self._outputs]
                    grads = torch.autograd.grad(
                        loss, [self._outputs[layer][0] for layer in recorded], allow_unused=True
                    )
                    for layer, grad in zip(recorded, grads, strict=True):
                        if grad is not None:
                            normalised = self._outputs[layer][1]
                            totals[layer] += torch.stack(
                                [grad.double().sum(dim=(0, 2, 3)), (grad * normalised).double().sum(dim=(0, 2, 3))]
                            )
                    # The graph below this layer was not traversed: drop it before the next micro-batch's forward.
                    del loss, grads
                    self._outputs = {}
                self._record = set()
                for layer in group:
                    summed = ddp.all_reduce_sum(totals[layer])
                    device, dtype = layer.weight.device, layer.weight.dtype
                    state = self._state[layer]
                    state.grad_sums = (summed[0].to(device, dtype), summed[1].to(device, dtype), state.count)
            total = 0.0
            for i in range(count):  # 3. the step's gradients
                loss = loss_of(i)
                loss.backward()
                total += float(loss.detach())
        for layer in self.layers:
            self._update_running(layer)
        return total

    def _finish_statistics(self, layer: _BatchNorm) -> None:
        state = self._state[layer]
        device, dtype = layer.weight.device, layer.weight.dtype
        sums = state.sums
        if sums is None:  # this rank had no image in the batch
            sums = torch.zeros(2, layer.num_features, dtype=torch.float64, device=device)
        count = torch.tensor([state.count], dtype=torch.float64, device=device)
        moments = ddp.all_reduce_sum(torch.cat([sums.flatten(), count])).cpu()
        channels = layer.num_features
        state.count = float(moments[-1])
        if state.count == 0:
            raise ValueError("a batch with no image reached BatchNorm")
        mean = moments[:channels] / state.count
        var = (moments[channels : 2 * channels] / state.count - mean * mean).clamp_min(0.0)
        state.mean, state.var = mean.to(device, dtype), var.to(device, dtype)
        state.sums = None

    def _update_running(self, layer: _BatchNorm) -> None:
        """``BatchNorm2d``'s running-statistics update with the whole batch's moments (unbiased variance)."""
        state = self._state[layer]
        if not layer.track_running_stats or state.mean is None:
            return
        # ``track_running_stats`` guarantees the buffers; ``_finish_statistics`` sets ``var`` together with ``mean``.
        assert layer.running_mean is not None and layer.running_var is not None
        assert layer.num_batches_tracked is not None and state.var is not None
        with torch.no_grad():
            layer.num_batches_tracked += 1
            momentum = layer.momentum if layer.momentum is not None else 1.0 / float(layer.num_batches_tracked)
            unbiased = state.var * state.count / max(state.count - 1, 1.0)
            layer.running_mean.mul_(1 - momentum).add_(momentum * state.mean)
            layer.running_var.mul_(1 - momentum).add_(momentum * unbiased)
