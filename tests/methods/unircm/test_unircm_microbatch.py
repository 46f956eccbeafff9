"""Micro-batched Uni-RCM training equals whole-batch training; the preflight refuses budgets too small."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn

from mmiad.data.mvtec3d import list_records
from mmiad.methods.unircm import UniRCM, UniRCMConfig
from mmiad.methods.unircm.batchnorm import StopForwardError, WholeBatchNorm
from mmiad.methods.unircm.blocks import RefGuidedMapping
from mmiad.methods.unircm.memory import plan_training, step_cost
from mmiad.methods.unircm.training import train_mappings
from mmiad.utils.budget import GIB, MemoryBudgetError, MicroBatchPlan

GRID = 6


def _store(images: int = 7) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return {
        i: (
            torch.randn(GRID * GRID, 5, generator=generator, dtype=torch.float64),
            torch.randn(GRID * GRID, 4, generator=generator, dtype=torch.float64),
            torch.rand(GRID * GRID, generator=generator) > 0.3,  # unequal foreground counts per image
        )
        for i in range(images)
    }


def _train(micro: int, batch_norm: str = "exact", checkpointing: bool = False) -> tuple[nn.Module, list[float]]:
    torch.manual_seed(1)
    shape = {"hidden": 8, "grid": GRID, "num_blocks": 2}
    networks = nn.ModuleList([RefGuidedMapping(5, 4, **shape), RefGuidedMapping(4, 5, **shape)]).double()
    store = _store()
    history = train_mappings(
        *networks,
        store,
        sorted(store),
        epochs=2,  # two epochs of one 7-image step (split 3+2+2 for micro 3)
        batch_size=7,
        learning_rate=1e-3,
        mse_weight=0.01,
        mse_scale=(1.0, 1.0),
        seed=0,
        plan=MicroBatchPlan(7, micro, 0.0, 0.0, 1.0),
        batch_norm=batch_norm,
        checkpointing=checkpointing,
    )
    return networks, history


def _max_difference(a: nn.Module, b: nn.Module) -> float:
    return max(
        float((x - y).abs().max()) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


@pytest.mark.parametrize(("micro", "checkpointing"), [(3, False), (1, False), (3, True), (7, True)])
def test_micro_batches_equal_the_whole_batch(micro: int, checkpointing: bool) -> None:
    whole, whole_history = _train(7)
    split, split_history = _train(micro, checkpointing=checkpointing)
    # Parameters and BatchNorm running statistics after two Adam steps, float64: equal up to rounding.
    assert _max_difference(whole, split) < 1e-12
    assert split_history == pytest.approx(whole_history, rel=1e-12)
    assert _max_difference(whole, _train(1, batch_norm="per_micro_batch")[0]) > 1e-4  # the cheap mode differs


def test_per_micro_batch_statistics_match_accumulation_of_separate_batch_norms() -> None:
    """Independent reference: each micro-batch normalised by plain BatchNorm2d, gradients summed by hand."""
    torch.manual_seed(0)
    layer = nn.BatchNorm2d(3).double()
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    reference = copy.deepcopy(layer)
    (reference(x) * weights).sum().backward()
    expected = x.grad.clone()
    x.grad = None

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = layer

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            return self.norm(inputs)

    net = Net()
    driver = WholeBatchNorm([net])
    parts = [slice(0, 2), slice(2, 3), slice(3, 6)]

    def forward(i: int) -> None:
        with contextlib.suppress(StopForwardError):
            net(x[parts[i]])

    driver.step(3, forward, lambda i: (net(x[parts[i]]) * weights[parts[i]]).sum())
    assert torch.allclose(x.grad, expected, atol=1e-12)  # whole-batch BatchNorm's input gradient
    assert torch.allclose(layer.weight.grad, reference.weight.grad, atol=1e-12)
    assert torch.allclose(layer.running_var, reference.running_var, atol=1e-12)
    assert torch.allclose(layer.running_mean, reference.running_mean, atol=1e-12)
    assert int(layer.num_batches_tracked) == 1


def test_estimate_grows_with_the_networks_and_checkpointing_saves_memory() -> None:
    small = [RefGuidedMapping(42, 33, hidden=64, grid=56), RefGuidedMapping(33, 42, hidden=64, grid=56)]
    large = [RefGuidedMapping(42, 33, hidden=128, grid=56), RefGuidedMapping(33, 42, hidden=128, grid=56)]
    plain, checkpointed = step_cost(*small), step_cost(*small, checkpointing=True)
    assert step_cost(*large).per_image_bytes > 1.5 * plain.per_image_bytes
    assert checkpointed.per_image_bytes < plain.per_image_bytes
    # At least what the embeddings alone keep: each direction's (G², hidden) float32 output of its first Linear.
    assert plain.per_image_bytes > 2 * 56 * 56 * 64 * 4


def test_automatic_plan_prefers_the_whole_batch_with_checkpointing_over_splitting() -> None:
    networks = [RefGuidedMapping(42, 33, hidden=64, grid=56), RefGuidedMapping(33, 42, hidden=64, grid=56)]
    plain, checkpointed = step_cost(*networks), step_cost(*networks, checkpointing=True)
    between = (
        checkpointed.fixed_bytes + 8 * checkpointed.per_image_bytes + plain.fixed_bytes + 8 * plain.per_image_bytes
    ) / 2
    plan = plan_training(*networks, batch_size=8, memory_budget_gb=between / GIB)
    assert (plan.micro_batch, plan.checkpointing) == (8, True)
    roomy = plan_training(*networks, batch_size=8, memory_budget_gb=100.0)
    assert (roomy.micro_batch, roomy.checkpointing) == (8, False)
    tight = plan_training(
        *networks, batch_size=8, memory_budget_gb=(plain.fixed_bytes + 3.5 * plain.per_image_bytes) / GIB
    )
    assert (tight.micro_batch, tight.checkpointing) == (3, False)


def test_preflight_refuses_a_budget_too_small_before_training(tiny_dataset, tmp_path) -> None:
    records = list_records(tiny_dataset, "puck", "train")[:2]
    config = UniRCMConfig(image_size=64, grid_size=8, hidden=16, num_blocks=1, epochs=1, memory_budget_gb=1e-4)
    with pytest.raises(MemoryBudgetError, match=r"raise memory_budget_gb \(--memory-budget-gb\)"):
        UniRCM(config, cache_dir=str(tmp_path)).fit(records)


def test_cli_prints_the_refusal_as_one_line(tiny_dataset, tmp_path, capsys) -> None:
    from mmiad.cli.main import main

    code = main(
        [
            "train",
            "--method",
            "unircm",
            "--data",
            str(tiny_dataset),
            "--out",
            str(tmp_path / "run"),
            "--categories",
            "puck",
            "--image-size",
            "64",
            "--grid-size",
            "8",
            "--memory-budget-gb",
            "0.0001",
            "--set",
            "hidden=16",
            "--set",
            "num_blocks=1",
            "--epochs",
            "1",
            "--cache-dir",
            str(tmp_path / "cache"),
        ]
    )
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code == 1
    assert len(lines) == 1 and "raise memory_budget_gb (--memory-budget-gb)" in lines[0]
