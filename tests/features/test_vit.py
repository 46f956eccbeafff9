"""ViT extractor: architecture against an independent functional reference, checkpoint formats, pruning, errors."""

from __future__ import annotations

import argparse
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from mmiad.features.checkpoints import CheckpointError
from mmiad.features.vit import VIT_PRESETS, VisionTransformer, VitExtractor, VitPreset, load_vit_weights

TINY = VitPreset(
    "tiny", embed_dim=16, depth=3, num_heads=2, patch_size=4, pos_grid=3, layer_scale=False, keep_blocks=3, weights=()
)


def random_state(preset: VitPreset, seed: int) -> dict[str, torch.Tensor]:
    """A checkpoint-like state dict with every tensor random (LayerNorm/LayerScale included)."""
    generator = torch.Generator().manual_seed(seed)
    full = VisionTransformer(replace(preset, keep_blocks=preset.depth)).state_dict()
    return {k: torch.randn(v.shape, generator=generator) * 0.3 for k, v in full.items()}


def reference_forward(state: dict[str, torch.Tensor], preset: VitPreset, rgb: torch.Tensor, keep: int) -> torch.Tensor:
    """The ViT written out with functional ops and explicit softmax attention, straight from the tensors."""
    dim, heads = preset.embed_dim, preset.num_heads
    x = F.conv2d(rgb, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=preset.patch_size)
    batch, _, rows, cols = x.shape
    x = torch.cat([state["cls_token"].expand(batch, 1, dim), x.flatten(2).transpose(1, 2)], 1) + state["pos_embed"]
    for i in range(keep):
        p = f"blocks.{i}."
        h = F.layer_norm(x, (dim,), state[p + "norm1.weight"], state[p + "norm1.bias"], eps=1e-6)
        q, k, v = F.linear(h, state[p + "attn.qkv.weight"], state[p + "attn.qkv.bias"]).chunk(3, dim=-1)
        split = lambda t: t.reshape(batch, -1, heads, dim // heads).transpose(1, 2)  # noqa: E731
        att = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(dim // heads), dim=-1)
        out = (att @ split(v)).transpose(1, 2).reshape(batch, -1, dim)
        out = F.linear(out, state[p + "attn.proj.weight"], state[p + "attn.proj.bias"])
        x = x + (out * state[p + "ls1.gamma"] if preset.layer_scale else out)
        h = F.layer_norm(x, (dim,), state[p + "norm2.weight"], state[p + "norm2.bias"], eps=1e-6)
        h = F.linear(
            F.gelu(F.linear(h, state[p + "mlp.fc1.weight"], state[p + "mlp.fc1.bias"])),
            state[p + "mlp.fc2.weight"],
            state[p + "mlp.fc2.bias"],
        )
        x = x + (h * state[p + "ls2.gamma"] if preset.layer_scale else h)
    x = F.layer_norm(x, (dim,), state["norm.weight"], state["norm.bias"], eps=1e-6)
    return x[:, 1:].transpose(1, 2).reshape(batch, dim, rows, cols)


def extractor_from(path: Path, preset: VitPreset) -> VitExtractor:
    model = VisionTransformer(preset)
    load_vit_weights(model, path)
    return VitExtractor(model, "test")


def test_official_dino_file_matches_reference(tmp_path: Path) -> None:
    state = random_state(TINY, 0)
    torch.save(state, tmp_path / "dino.pth")
    rgb = torch.randn(2, 3, 12, 12)
    features = extractor_from(tmp_path / "dino.pth", TINY).extract(rgb)
    assert features.shape == (2, 16, 3, 3) and features.dtype == torch.float32
    torch.testing.assert_close(features, reference_forward(state, TINY, rgb, 3), rtol=1e-4, atol=1e-5)


def test_wrapped_teacher_checkpoint_and_timm_safetensors_load_the_same_tensors(tmp_path: Path) -> None:
    state = random_state(TINY, 1)
    teacher = {f"module.backbone.{k}": v for k, v in state.items()} | {"module.head.mlp.0.weight": torch.ones(2)}
    torch.save({"teacher": teacher, "epoch": 100}, tmp_path / "full.pth")
    save_file(state | {"head.weight": torch.zeros(3, 16)}, str(tmp_path / "model.safetensors"))
    rgb = torch.randn(1, 3, 12, 12)
    expected = reference_forward(state, TINY, rgb, 3)
    for name in ("full.pth", "model.safetensors"):
        torch.testing.assert_close(extractor_from(tmp_path / name, TINY).extract(rgb), expected, rtol=1e-4, atol=1e-5)


def test_pruned_model_loads_full_checkpoint_and_equals_truncated_reference(tmp_path: Path) -> None:
    state = random_state(TINY, 2)
    torch.save(state, tmp_path / "dino.pth")
    rgb = torch.randn(1, 3, 12, 12)
    pruned = extractor_from(tmp_path / "dino.pth", replace(TINY, keep_blocks=1))
    assert len(pruned.model.blocks) == 1
    torch.testing.assert_close(pruned.extract(rgb), reference_forward(state, TINY, rgb, 1), rtol=1e-4, atol=1e-5)
    assert pruned.config()["keep_blocks"] == 1


def test_mismatched_checkpoint_lists_missing_unexpected_and_shapes(tmp_path: Path) -> None:
    state = random_state(TINY, 3)
    del state["blocks.1.attn.qkv.bias"]
    state["blocks.0.attn.extra"] = torch.zeros(1)
    state["norm.weight"] = torch.zeros(8)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as info:
        extractor_from(tmp_path / "bad.pth", TINY)
    assert info.value.missing == ["blocks.1.attn.qkv.bias"]
    assert info.value.unexpected == ["blocks.0.attn.extra"]
    assert info.value.mismatched == ["norm.weight: (8,) vs (16,)"]
    assert "blocks.1.attn.qkv.bias" in str(info.value) and "bad.pth" in str(info.value)


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    torch.save({"model": random_state(TINY, 4), "args": argparse.Namespace(lr=1)}, tmp_path / "pickle.pth")
    with pytest.raises(CheckpointError, match="weights_only"):
        extractor_from(tmp_path / "pickle.pth", TINY)


def test_layer_scale_zero_reduces_blocks_to_identity(tmp_path: Path) -> None:
    preset = replace(TINY, layer_scale=True)
    state = random_state(preset, 5)
    assert "blocks.0.ls1.gamma" in state and "blocks.2.ls2.gamma" in state
    for key in state:
        if key.endswith("gamma"):
            state[key] = torch.zeros_like(state[key])
    torch.save(state | {"mask_token": torch.zeros(1, 16)}, tmp_path / "dinov2.pth")
    rgb = torch.randn(1, 3, 12, 12)
    features = extractor_from(tmp_path / "dinov2.pth", preset).extract(rgb)
    torch.testing.assert_close(features, reference_forward(state, preset, rgb, 0), rtol=1e-4, atol=1e-5)


def test_position_embedding_from_other_grid_is_resized_bicubically(tmp_path: Path) -> None:
    state = random_state(TINY, 6)
    # A checkpoint trained for a 5×5 grid whose patch positions all share one vector: resizing must keep it.
    constant = torch.randn(1, 1, 16)
    state["pos_embed"] = torch.cat([torch.randn(1, 1, 16), constant.expand(1, 25, 16)], dim=1)
    torch.save(state, tmp_path / "grid5.pth")
    extractor = extractor_from(tmp_path / "grid5.pth", TINY)
    assert extractor.model.pos_grid == 5
    pos = extractor.model.position_embedding(3, 3)
    assert pos.shape == (1, 10, 16)
    torch.testing.assert_close(pos[:, 1:], constant.expand(1, 9, 16), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pos[:, :1], state["pos_embed"][:, :1])
    assert torch.equal(extractor.model.position_embedding(5, 5), extractor.model.pos_embed)


def test_preset_shapes_determinism_and_batch_independence() -> None:
    torch.manual_seed(0)
    extractor = VitExtractor(VisionTransformer(VIT_PRESETS["dino_vits8"]), "random")
    rgb = torch.randn(2, 3, 32, 32)
    first, second = extractor.extract(rgb), extractor.extract(rgb)
    assert first.shape == (2, 384, 4, 4) and extractor.out_channels == 384
    assert torch.equal(first, second)
    torch.testing.assert_close(extractor.extract(rgb[1:]), first[1:], rtol=1e-4, atol=1e-5)
    assert not first.is_inference()  # usable as input to training code


def test_presets_have_the_documented_architectures() -> None:
    b8 = VIT_PRESETS["dino_vitb8"]
    assert (b8.embed_dim, b8.num_heads, b8.depth, b8.patch_size, b8.pos_grid) == (768, 12, 12, 8, 28)
    assert [VIT_PRESETS[f"dino_vitb8_keep{k}"].keep_blocks for k in (8, 4, 1)] == [8, 4, 1]
    v2 = VIT_PRESETS["dinov2_vitb14"]
    assert v2.layer_scale and v2.patch_size == 14 and v2.pos_grid == 37


def test_bad_inputs_raise_value_errors() -> None:
    extractor = VitExtractor(VisionTransformer(TINY), "random")
    with pytest.raises(ValueError, match=r"\(B,3,H,W\)"):
        extractor.extract(torch.zeros(3, 12, 12))
    with pytest.raises(ValueError, match="multiple of patch size 4"):
        extractor.extract(torch.zeros(1, 3, 10, 12))
    with pytest.raises(ValueError, match="keep_blocks"):
        VisionTransformer(replace(TINY, keep_blocks=4))


def test_no_batch_dependent_or_stochastic_layer_so_train_mode_changes_nothing() -> None:
    """The official scripts never call ``.eval()``; for the ViT (timm's DINO: no BatchNorm, drop rates 0) that
    must not matter. Train and eval mode give identical outputs, and images do not influence each other."""
    stochastic = (nn.modules.batchnorm._BatchNorm, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)
    for name in ("dino_vitb8_keep1", "dinov2_vits14"):
        modules = list(VisionTransformer(replace(VIT_PRESETS[name], keep_blocks=1)).modules())
        assert not [m for m in modules if isinstance(m, stochastic) or "drop" in type(m).__name__.lower()]
    state = random_state(TINY, 5)
    model = VisionTransformer(TINY)
    model.load_state_dict(state)
    rgb = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        trained = model.train()(rgb)
        evaluated = model.eval()(rgb)
        singles = torch.cat([model.train()(rgb[i : i + 1]) for i in range(2)])
    assert torch.equal(trained, evaluated)
    torch.testing.assert_close(singles, trained, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(trained, reference_forward(state, TINY, rgb, 3), rtol=1e-4, atol=1e-5)
