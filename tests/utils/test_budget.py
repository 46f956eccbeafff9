from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from mmiad.utils import budget
from mmiad.utils.budget import (
    GIB,
    MemoryBudgetError,
    MemoryEstimateWarning,
    count_saved_bytes,
    plan_micro_batches,
    resolve_budget,
    split_batch,
)


def test_the_largest_micro_batch_that_fits_is_chosen() -> None:
    # 1 GB fixed + 0.5 GB per image in a 3.6 GB budget: 5 images fit (3.5 GB), 6 would not (4.0 GB).
    plan = plan_micro_batches(32, fixed_bytes=GIB, per_image_bytes=GIB / 2, budget_bytes=3.6 * GIB)
    assert (plan.micro_batch, plan.batch_size) == (5, 32)
    assert plan.peak_bytes == pytest.approx(3.5 * GIB)
    assert plan.spare_bytes == pytest.approx(0.1 * GIB)
    whole = plan_micro_batches(4, fixed_bytes=GIB, per_image_bytes=GIB / 2, budget_bytes=100 * GIB)
    assert whole.micro_batch == 4  # never more than the batch


def test_a_budget_too_small_for_one_image_is_refused_in_one_line() -> None:
    with pytest.raises(MemoryBudgetError) as error:
        plan_micro_batches(
            32, fixed_bytes=GIB, per_image_bytes=GIB, budget_bytes=1.5 * GIB, what="X training", hint=", or Y"
        )
    message = str(error.value)
    assert "\n" not in message
    assert "memory_budget_gb (--memory-budget-gb)" in message and "2.00 GB" in message and "1.50 GB" in message
    assert isinstance(error.value, ValueError)  # the CLI turns ValueErrors into one line
    with pytest.raises(MemoryBudgetError):  # a forced micro-batch is checked too
        plan_micro_batches(8, fixed_bytes=0, per_image_bytes=GIB, budget_bytes=3 * GIB, micro_batch=4)


def test_a_plan_close_to_the_budget_is_reported() -> None:
    with pytest.warns(MemoryEstimateWarning, match="estimated training peak 0.90 GB of a 1.00 GB budget"):
        plan_micro_batches(1, fixed_bytes=0.4 * GIB, per_image_bytes=0.5 * GIB, budget_bytes=GIB)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan_micro_batches(1, fixed_bytes=0.1 * GIB, per_image_bytes=0.1 * GIB, budget_bytes=GIB)


def test_split_batch_keeps_order_and_count() -> None:
    assert split_batch(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert split_batch([1], 3) == [[1], [], []]


def test_automatic_budget_reads_memavailable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       25000000 kB\nMemFree:  1000 kB\nMemAvailable:   10485760 kB\n")
    original = budget.Path
    monkeypatch.setattr(budget, "Path", lambda p: meminfo if p == "/proc/meminfo" else original(p))
    assert budget.available_ram_bytes() == 10 * GIB
    assert resolve_budget(None) == pytest.approx(budget.AUTO_FRACTION * 10 * GIB)
    assert resolve_budget(2.5) == 2.5 * GIB


def test_saved_bytes_are_counted_once_per_storage_without_parameters() -> None:
    linear = nn.Linear(10, 20)
    x = torch.randn(7, 10)
    with count_saved_bytes([linear]) as saved:
        hidden = linear(x)  # saves x (the weight is a parameter)
        torch.sigmoid(hidden).sum()  # saves its output (7×20)
    assert saved.total == 7 * 10 * 4 + 7 * 20 * 4
