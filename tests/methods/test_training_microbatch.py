"""CFM and M3DM's UFF: micro-batched (chunked) training equals whole-batch training up to float rounding."""

from __future__ import annotations

import copy

import pytest
import torch

from mmiad.methods.cfm.mapping import FeatureProjectionMLP, cosine_loss
from mmiad.methods.cfm.training import accumulate_batch, plan_cfm_training
from mmiad.methods.m3dm.fusion import FeatureFusionBlock, contrastive_backward, plan_contrastive_chunks
from mmiad.utils.budget import GIB, MemoryBudgetError


def _crossmodal(rows_2d: torch.Tensor, rows_3d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return rows_2d, rows_3d


def _cfm_steps(micro: int) -> list[torch.Tensor]:
    torch.manual_seed(0)
    to_3d, to_2d = FeatureProjectionMLP(6, 5).double(), FeatureProjectionMLP(5, 6).double()
    optimizer = torch.optim.Adam([*to_3d.parameters(), *to_2d.parameters()], lr=1e-2)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        # Images with different foreground counts: the micro-batch weights must follow the pixel shares.
        batch = [
            (
                torch.randn(n, 6, generator=generator, dtype=torch.float64),
                torch.randn(n, 5, generator=generator, dtype=torch.float64),
            )
            for n in (3, 11, 7, 1, 9)
        ]
        optimizer.zero_grad()
        loss = accumulate_batch(to_3d, to_2d, _crossmodal, batch, micro)
        whole = cosine_loss(to_3d(torch.cat([b[0] for b in batch])), torch.cat([b[1] for b in batch]))
        whole = whole + cosine_loss(to_2d(torch.cat([b[1] for b in batch])), torch.cat([b[0] for b in batch]))
        assert loss == pytest.approx(float(whole), rel=1e-12)  # the reported loss is the whole batch's
        optimizer.step()
    return [p.detach().clone() for p in [*to_3d.parameters(), *to_2d.parameters()]]


@pytest.mark.parametrize("micro", [1, 2, 3])
def test_cfm_micro_batches_equal_the_whole_batch(micro: int) -> None:
    for split, whole in zip(_cfm_steps(micro), _cfm_steps(5), strict=True):
        assert torch.allclose(split, whole, atol=1e-12, rtol=0)


def test_cfm_plan_chooses_from_the_budget_and_refuses_when_one_image_does_not_fit() -> None:
    to_3d, to_2d = FeatureProjectionMLP(42, 33), FeatureProjectionMLP(33, 42)
    options = {"channels": (42, 33), "rows_per_image": 224 * 224, "batch_size": 4}
    roomy = plan_cfm_training(to_3d, to_2d, _crossmodal, memory_budget_gb=100.0, **options)
    assert roomy.micro_batch == 4
    # Per image at least the two MLPs' inputs and outputs for every pixel (float32).
    assert roomy.per_image_bytes > 224 * 224 * (42 + 33) * 2 * 4
    two = (roomy.fixed_bytes + 2.5 * roomy.per_image_bytes) / GIB
    with pytest.warns(UserWarning):
        assert plan_cfm_training(to_3d, to_2d, _crossmodal, memory_budget_gb=two, **options).micro_batch == 2
    with pytest.raises(MemoryBudgetError, match=r"CFM training .* raise memory_budget_gb"):
        plan_cfm_training(to_3d, to_2d, _crossmodal, memory_budget_gb=roomy.per_image_bytes / 2 / GIB, **options)


def test_uff_chunked_contrastive_gradients_equal_the_whole_loss() -> None:
    torch.manual_seed(0)
    block = FeatureFusionBlock(5, 7, mlp_ratio=2.0).double()
    chunked = copy.deepcopy(block)
    generator = torch.Generator().manual_seed(3)
    xyz = torch.randn(40, 5, generator=generator, dtype=torch.float64)
    rgb = torch.randn(40, 7, generator=generator, dtype=torch.float64)
    loss = block.contrastive_loss(xyz, rgb)
    loss.backward()
    # A budget that fits about 16 query rows (not the 40 of the whole loss).
    plan = plan_contrastive_chunks(chunked, 40, None)
    budget = (plan.fixed_bytes + 16.5 * plan.per_image_bytes) / GIB
    assert plan_contrastive_chunks(chunked, 40, budget).micro_batch == 16
    chunked_loss = contrastive_backward(chunked, xyz, rgb, memory_budget_gb=budget)
    assert chunked_loss == pytest.approx(float(loss), rel=1e-12)
    for (name, p), q in zip(block.named_parameters(), chunked.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-12, rtol=0), name
