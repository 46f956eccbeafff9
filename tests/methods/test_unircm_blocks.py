from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mmiad.methods.unircm.blocks import GridBatchNorm, RefGuideBlock, RefGuidedMapping, sincos_position_encoding

TINY = {"hidden": 16, "grid": 8, "num_blocks": 1}


def test_position_encoding_values_by_hand() -> None:
    pe = sincos_position_encoding(grid=3, dim=8)
    assert pe.shape == (9, 8)
    # Cell (1, 2) is row 5; quarter = 2 frequencies 1 and 1/100; row half then column half, each [sin.., cos..].
    row, col = 1.0, 2.0
    expected = [math.sin(row), math.sin(row / 100), math.cos(row), math.cos(row / 100)]
    expected += [math.sin(col), math.sin(col / 100), math.cos(col), math.cos(col / 100)]
    torch.testing.assert_close(pe[5], torch.tensor(expected))
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_position_encoding(4, 10)


@pytest.mark.parametrize("branches", ["none", "rfi", "ram", "rfi+ram"])
def test_mapping_shapes(branches: str) -> None:
    torch.manual_seed(0)
    net = RefGuidedMapping(6, 4, branches=branches, **TINY)
    out = net(torch.randn(3, 64, 6))
    assert out.shape == (3, 64, 4)
    with pytest.raises(ValueError, match="expected"):
        net(torch.randn(3, 63, 6))


def test_reference_and_alpha_initialisation() -> None:
    torch.manual_seed(0)
    net = RefGuidedMapping(6, 4, hidden=16, grid=8, num_blocks=2)
    assert net.reference.shape == (1, 64, 16)
    assert 0.05 < float(net.reference.detach().std()) < 0.15  # randn · 0.1
    assert all(float(block.alpha.detach()) == 0.5 for block in net.blocks)
    # The position encodings are recomputed, not stored in model files.
    assert not any("position" in name for name in net.state_dict())


def test_branch_switch_removes_parameters() -> None:
    def names(branches: str) -> set[str]:
        return {n.split(".")[0] for n, _ in RefGuideBlock(16, 8, branches).named_parameters()}

    common = {"norm_features", "norm_reference", "ffn_norm", "ffn"}
    assert names("rfi") == common | {"rfi_q", "rfi_k", "rfi_v", "rfi_conv", "rfi_bn", "rfi_out"}
    assert names("ram") == common | {"ram_gate", "ram_out"}
    assert names("rfi+ram") == names("rfi") | names("ram") | {"alpha_logit"}
    baseline = {n.split(".")[0] for n, _ in RefGuidedMapping(6, 4, branches="none", **TINY).named_parameters()}
    assert baseline == {"baseline"}
    with pytest.raises(ValueError):
        RefGuidedMapping(6, 4, branches="attention", **TINY)


def test_fusion_is_alpha_mix_of_the_two_branches() -> None:
    torch.manual_seed(0)
    block = RefGuideBlock(16, 4, "rfi+ram").eval()
    x, ref = torch.randn(2, 16, 16), torch.randn(1, 16, 16)
    with torch.no_grad():
        block.alpha_logit.fill_(math.log(3.0))  # α = 0.75
        f, r = block.norm_features(x), block.norm_reference(ref)
        fused = 0.75 * block._rfi(f, r) + 0.25 * block._ram(f, r)
        torch.testing.assert_close(block(x, ref), fused + block.ffn(block.ffn_norm(fused)))


def test_ram_branch_is_gated_features() -> None:
    torch.manual_seed(0)
    block = RefGuideBlock(16, 4, "ram")
    f, r = torch.randn(2, 16, 16), torch.randn(1, 16, 16)
    gate = block.ram_gate(torch.cat([f, r.expand(2, -1, -1)], dim=-1))
    torch.testing.assert_close(block._ram(f, r), block.ram_out(f * torch.sigmoid(gate)))


def test_grid_batchnorm_matches_batchnorm_without_process_group() -> None:
    torch.manual_seed(0)
    ours, reference = GridBatchNorm(5), nn.BatchNorm2d(5)
    x = torch.randn(3, 5, 4, 4) * 2 + 1
    torch.testing.assert_close(ours(x), reference(x))
    torch.testing.assert_close(ours.running_var, reference.running_var)
