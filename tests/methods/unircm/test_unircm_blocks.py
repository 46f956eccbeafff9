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
    # Cell (1, 2) is row 5. Official layout: column half first, then row half; each half interleaves sin/cos
    # over frequencies 10000^(-2i/4) = 1 and 1/100.
    row, col = 1.0, 2.0
    expected = [math.sin(col), math.cos(col), math.sin(col / 100), math.cos(col / 100)]
    expected += [math.sin(row), math.cos(row), math.sin(row / 100), math.cos(row / 100)]
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
    assert net.ref_param.shape == (1, 64, 16)
    assert 0.05 < float(net.ref_param.detach().std()) < 0.15  # randn · 0.1
    assert all(float(block.alpha.detach()) == 0.5 for block in net.blocks)
    # The position encodings are stored (released checkpoints carry them as buffers).
    state = net.state_dict()
    torch.testing.assert_close(state["feat_embed.pos_enc.pe"][0], sincos_position_encoding(8, 16))
    torch.testing.assert_close(state["ref_pos.pe"][0], sincos_position_encoding(8, 16))


def test_initialisation_follows_the_official_init_weights() -> None:
    """Block Linears: Xavier-uniform, zero bias; depthwise conv: Kaiming-normal fan-out, zero bias; embedding:
    Kaiming-normal fan-out with gain 1."""
    torch.manual_seed(0)
    dim = 64
    net = RefGuidedMapping(48, 40, hidden=dim, grid=8, num_blocks=1)
    block = net.blocks[0]
    linears = [m for m in block.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 9  # q, k, v, rfi_proj, ram_gate ×2, ram_proj, ffn ×2
    for linear in linears:
        fan_out, fan_in = linear.weight.shape
        bound = math.sqrt(6 / (fan_in + fan_out))
        assert float(linear.weight.detach().abs().max()) <= bound
        assert float(linear.weight.detach().abs().max()) > 0.9 * bound  # uniform up to the bound, not narrower
        assert not linear.bias.any()
    conv = block.rfi_local[0]
    assert conv.bias is not None and not conv.bias.any()
    # Kaiming normal, gain √2; torch's fan_out ignores groups: out_channels·3·3 = 576, so std √(2/576).
    assert abs(float(conv.weight.detach().std()) - math.sqrt(2 / (dim * 9))) < 0.006
    proj = net.feat_embed.proj
    assert abs(float(proj.weight.detach().std()) - math.sqrt(1 / dim)) < 0.01  # gain 1, fan_out = dim
    assert not proj.bias.any()


def test_block_draws_the_official_initial_weights_in_the_official_order() -> None:
    """Under one random state, the same draws as the official block: each layer's default init at construction
    (q, k, v, depthwise conv, rfi_proj, ram_gate.0, ram_gate.2, ram_proj, ffn.0, ffn.3), then ``_init_weights``
    over ``modules()`` in that order (Xavier for Linear, Kaiming-normal fan-out for the conv)."""
    dim = 8
    torch.manual_seed(3)
    block = RefGuideBlock(dim, 4, "rfi+ram")
    torch.manual_seed(3)
    shapes = [(dim, dim)] * 3 + [(dim, 1, 3, 3)] + [(dim, dim), (dim, 2 * dim), (dim, dim), (dim, dim)]
    shapes += [(2 * dim, dim), (dim, 2 * dim)]
    for shape in shapes:  # nn.Linear / nn.Conv2d reset_parameters
        weight = torch.empty(shape)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        fan_in = weight[0].numel()
        nn.init.uniform_(torch.empty(shape[0]), -(fan_in**-0.5), fan_in**-0.5)
    expected = []
    for shape in shapes:  # _init_weights
        weight = torch.empty(shape)
        if len(shape) == 4:
            nn.init.kaiming_normal_(weight, mode="fan_out")
        else:
            nn.init.xavier_uniform_(weight)
        expected.append(weight)
    names = ["rfi_q", "rfi_k", "rfi_v", "rfi_local.0", "rfi_proj", "ram_gate.0", "ram_gate.2", "ram_proj"]
    names += ["ffn.0", "ffn.3"]
    state = block.state_dict()
    for name, weight in zip(names, expected, strict=True):
        torch.testing.assert_close(state[f"{name}.weight"], weight, rtol=0, atol=0, msg=name)


def test_conv_bias_acts_in_eval_mode_but_gets_no_gradient() -> None:
    torch.manual_seed(0)
    block = RefGuideBlock(16, 4, "rfi")
    x, ref = torch.randn(2, 16, 16), torch.randn(1, 16, 16)
    block(x, ref).square().sum().backward()
    assert block.rfi_local[0].bias.grad is None
    assert block.rfi_local[0].weight.grad is not None
    block.eval()
    before = block(x, ref).detach()
    with torch.no_grad():
        block.rfi_local[0].bias.fill_(0.5)
    assert not torch.allclose(block(x, ref), before)


def test_branch_switch_removes_parameters() -> None:
    def names(branches: str) -> set[str]:
        return {n.split(".")[0] for n, _ in RefGuideBlock(16, 8, branches).named_parameters()}

    common = {"feat_norm", "ref_norm", "ffn_norm", "ffn"}
    assert names("rfi") == common | {"rfi_q", "rfi_k", "rfi_v", "rfi_local", "rfi_proj"}
    assert names("ram") == common | {"ram_gate", "ram_proj"}
    assert names("rfi+ram") == names("rfi") | names("ram") | {"branch_alpha"}
    baseline = {n.split(".")[0] for n, _ in RefGuidedMapping(6, 4, branches="none", **TINY).named_parameters()}
    assert baseline == {"baseline"}
    with pytest.raises(ValueError):
        RefGuidedMapping(6, 4, branches="attention", **TINY)


def test_fusion_is_alpha_mix_of_the_two_branches() -> None:
    torch.manual_seed(0)
    block = RefGuideBlock(16, 4, "rfi+ram").eval()
    x, ref = torch.randn(2, 16, 16), torch.randn(1, 16, 16)
    with torch.no_grad():
        block.branch_alpha.fill_(math.log(3.0))  # α = 0.75
        f, r = block.feat_norm(x), block.ref_norm(ref)
        fused = 0.75 * block._rfi(f, r) + 0.25 * block._ram(f, r)
        torch.testing.assert_close(block(x, ref), fused + block.ffn(block.ffn_norm(fused)))


def test_ram_branch_is_gated_features() -> None:
    torch.manual_seed(0)
    block = RefGuideBlock(16, 4, "ram")
    f, r = torch.randn(2, 16, 16), torch.randn(1, 16, 16)
    gate = block.ram_gate(torch.cat([f, r.expand(2, -1, -1)], dim=-1))
    torch.testing.assert_close(block._ram(f, r), block.ram_proj(f * gate))


def test_grid_batchnorm_matches_batchnorm_without_process_group() -> None:
    torch.manual_seed(0)
    ours, reference = GridBatchNorm(5), nn.BatchNorm2d(5)
    x = torch.randn(3, 5, 4, 4) * 2 + 1
    torch.testing.assert_close(ours(x), reference(x))
    torch.testing.assert_close(ours.running_var, reference.running_var)
