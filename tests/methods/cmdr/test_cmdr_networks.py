"""CMDR-IAD's networks: sizes against the fact sheet, official parameter names, and layers against references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mmiad.methods.cmdr.networks import (
    ChunkAttention,
    Decoder2D,
    Decoder3D,
    MappingMLP,
    SameSizeConvTranspose2d,
    attention_heads,
    build_networks,
)


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_full_size_parameter_counts_match_the_fact_sheet() -> None:
    """768/1152 channels on the 224² grid, built on the meta device (no memory, no forward)."""
    with torch.device("meta"):
        networks = build_networks(768, 1152, 224)
    assert count(networks["map2Dto3D"]) == 3_694_272
    assert count(networks["map3Dto2D"]) == 3_693_888
    dec2d, dec3d = networks["Dec2D"], networks["Dec3D"]
    assert round(count(dec2d) / 1e6, 2) == 5.03
    assert round(count(dec3d) / 1e6, 2) == 87.84
    # The sheet's breakdowns: projection 0.44 M, attention block 1.18 M, conv 1.62 M, head 1.77 M ...
    parts_2d = [round(count(getattr(dec2d, k)) / 1e6, 2) for k in ("projection", "attn", "conv_decoder", "reconstruct")]
    assert parts_2d == [0.44, 1.18, 1.62, 1.77]
    # ... and projection 81.14 M, deconvolutions 6.36 M, squeeze-excitation 0.33 M.
    parts_3d = [round(count(getattr(dec3d, k)) / 1e6, 2) for k in ("projection", "decoder", "attention")]
    assert parts_3d == [81.14, 6.36, 0.33]
    # Decoder3D's first Linear runs over the 50176-long token axis down to 1568 per channel.
    assert tuple(dec3d.projection[0].weight.shape) == (1568, 50176)
    assert dec2d.attn.attn.heads == 8 and dec2d.attn.attn.window == 128
    assert tuple(dec2d.attn.attn.qkv.weight.shape) == (1152, 384)


def test_state_dict_names_are_the_official_ones() -> None:
    """``Map.py``/``Dec2d.py``/``Dec3d.py`` attribute names and Sequential positions, so their files load."""
    networks = build_networks(32, 48, 16)
    assert set(networks["map2Dto3D"].state_dict()) == {
        f"{layer}.{p}"
        for layer in ("input", "projection.0", "projection.2", "projection.4", "projection.6", "output")
        for p in ("weight", "bias")
    }
    dec2d = set(networks["Dec2D"].state_dict())
    for key in (
        "projection.6.bias", "attn.norm1.weight", "attn.attn.qkv.weight", "attn.attn.proj.bias", "attn.norm2.bias",
        "attn.mlp.0.weight", "attn.mlp.3.weight", "conv_decoder.0.weight", "conv_decoder.1.running_mean",
        "conv_decoder.7.num_batches_tracked", "reconstruct.0.weight", "reconstruct.3.bias", "reconstruct.4.weight",
    ):  # fmt: skip
        assert key in dec2d
    dec3d = set(networks["Dec3D"].state_dict())
    for key in (
        "projection.0.weight", "projection.6.bias", "decoder.0.weight", "decoder.1.running_var", "decoder.10.weight",
        "decoder.12.weight", "attention.1.weight", "attention.3.bias",
    ):  # fmt: skip
        assert key in dec3d
    assert "decoder.13.weight" not in dec3d  # Tanh after the last deconvolution, no BatchNorm


def test_same_size_transposed_convolution_equals_pytorchs() -> None:
    torch.manual_seed(0)
    reference = nn.ConvTranspose2d(5, 7, kernel_size=3, stride=1, padding=1)
    fast = SameSizeConvTranspose2d(5, 7, kernel_size=3, stride=1, padding=1)
    fast.load_state_dict(reference.state_dict())
    x = torch.randn(2, 5, 9, 11)
    torch.testing.assert_close(fast(x), reference(x), rtol=1e-5, atol=1e-5)


def _chunk_attention_numpy(module: ChunkAttention, x: np.ndarray) -> np.ndarray:
    """Float64 re-derivation: zero-padded consecutive chunks, softmax per chunk (padded keys included)."""
    w_qkv = module.qkv.weight.detach().double().numpy()
    b_qkv = module.qkv.bias.detach().double().numpy()
    w_out, b_out = module.proj.weight.detach().double().numpy(), module.proj.bias.detach().double().numpy()
    tokens, width = x.shape
    heads, window = module.heads, module.window
    head_dim = width // heads
    qkv = x @ w_qkv.T + b_qkv
    padded = -(-tokens // window) * window
    out = np.zeros((tokens, width))
    for h in range(heads):
        q, k, v = (
            np.vstack(
                [
                    qkv[:, i * width + h * head_dim : i * width + (h + 1) * head_dim],
                    np.zeros((padded - tokens, head_dim)),
                ]
            )
            for i in range(3)
        )
        for start in range(0, padded, window):
            s = q[start : start + window] @ k[start : start + window].T / np.sqrt(head_dim)
            p = np.exp(s - s.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            block = p @ v[start : start + window]
            end = min(start + window, tokens)
            if start < tokens:
                out[start:end, h * head_dim : (h + 1) * head_dim] = block[: end - start]
    return out @ w_out.T + b_out


@pytest.mark.parametrize("tokens", [24, 30])  # 30: the last chunk is zero-padded
def test_chunk_attention_against_numpy(tokens: int) -> None:
    torch.manual_seed(1)
    module = ChunkAttention(12, heads=3, window=8).eval()
    x = torch.randn(1, tokens, 12)
    expected = _chunk_attention_numpy(module, x[0].double().numpy())
    np.testing.assert_allclose(module(x)[0].detach().double().numpy(), expected, rtol=1e-4, atol=1e-5)


def test_chunks_are_independent() -> None:
    """A token only attends inside its 8-token raster chunk."""
    torch.manual_seed(2)
    module = ChunkAttention(8, heads=2, window=8).eval()
    x = torch.randn(1, 24, 8)
    changed = x.clone()
    changed[0, 3] += 5.0
    with torch.no_grad():
        diff = (module(changed) - module(x)).abs().sum(-1)[0]
    assert float(diff[:8].min()) > 0 and float(diff[8:].max()) == 0.0


def test_mapping_mlp_against_a_functional_reference() -> None:
    torch.manual_seed(3)
    mlp = MappingMLP(6, 10).eval()
    assert mlp.input.out_features == 8  # (6 + 10) // 2
    x = torch.randn(5, 6)
    p = mlp.projection
    h = torch.nn.functional.gelu(mlp.input(x))
    h = torch.nn.functional.layer_norm(torch.nn.functional.gelu(p[0](h)), (8,), p[2].weight, p[2].bias)
    h = torch.nn.functional.layer_norm(torch.nn.functional.gelu(p[4](h)), (8,), p[6].weight, p[6].bias)
    torch.testing.assert_close(mlp(x), mlp.output(h))


@torch.no_grad()
def test_decoders_keep_the_shape_and_decoder3d_mixes_positions() -> None:
    torch.manual_seed(4)
    dec2d, dec3d = Decoder2D(16, grid=8).eval(), Decoder3D(12, grid=8).eval()
    x2, x3 = torch.randn(1, 64, 16), torch.randn(1, 64, 12)
    assert dec2d(x2).shape == (1, 64, 16)
    y = dec3d(x3)
    assert y.shape == (1, 64, 12) and float(y.abs().max()) < 1.0  # Tanh, then a sigmoid gate
    assert tuple(dec3d.projection[0].weight.shape) == (2, 64)  # 64 tokens → 64 // 32
    changed = x3.clone()
    changed[0, 0] += 3.0
    assert float((dec3d(changed) - y)[0, -1].abs().max()) > 0  # the first token moves the last one
    with pytest.raises(ValueError, match="divisible by 32"):
        Decoder3D(12, grid=12)


def test_attention_heads_fall_back_for_narrow_widths() -> None:
    assert attention_heads(384) == 8
    assert attention_heads(21) == 1  # the weight-free preset's 42 channels
    assert attention_heads(20) == 4
