"""Point-MAE extractor: encoder against the plain Conv1d formulation, layer choice, official checkpoint format."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_clouds import cloud, randomise

from mmiad.features.checkpoints import CheckpointError
from mmiad.features.grouping import group_points, three_nn_weights
from mmiad.features.pointmae import (
    POINTMAE_PRESETS,
    PointMaeEncoder,
    PointMaeExtractor,
    PointMaePreset,
    load_pointmae_weights,
)

SMALL = PointMaePreset("small", num_group=16, group_size=8, keep_blocks=12, layers=(3, 7, 11))
DIM = 32  # a narrow model keeps the tests fast; the architecture is otherwise the released one


def narrow(keep: int = 12, layers: tuple[int, ...] = (3, 7, 11)) -> PointMaeEncoder:
    return PointMaeEncoder(keep, layers, dim=DIM, num_heads=2)


def official_checkpoint(state: dict[str, torch.Tensor]) -> dict:
    """Wrap encoder tensors like Point-MAE's ``save_checkpoint`` with DDP: decoder and extras included."""
    base = {f"module.MAE_encoder.{k}": v for k, v in state.items()}
    base["module.mask_token"] = torch.zeros(1, 1, DIM)
    base["module.MAE_decoder.blocks.0.norm1.weight"] = torch.ones(DIM)
    base["module.decoder_pos_embed.0.weight"] = torch.ones(128, 3)
    base["module.increase_dim.0.weight"] = torch.ones(96, DIM, 1)
    return {"base_model": base, "optimizer": {"state": {}}, "epoch": 300, "metrics": {}, "best_metrics": {}}


@pytest.mark.parametrize("batchnorm", ["cloud", "running"])
def test_encoder_equals_plain_conv1d_formulation(batchnorm: str) -> None:
    """The chunked, split-weight Mini-PointNet against the official Sequentials on all groups at once.

    ``cloud`` must equal the Sequentials in training mode (BatchNorm over all G·K values), ``running`` in eval
    mode; 300 groups span three chunks.
    """
    model = PointMaeEncoder(12, (3, 7, 11), dim=DIM, num_heads=2, batchnorm=batchnorm).eval()
    model.load_state_dict(randomise(model, 0))
    reference_net = copy.deepcopy(model.encoder).train(batchnorm == "cloud")
    groups = torch.randn(300, 8, 3) * 0.05  # more groups than one chunk
    with torch.no_grad():
        fast = model.encoder(groups)
        x = groups.transpose(2, 1)
        local = reference_net.first_conv(x)
        both = torch.cat([local.amax(dim=2, keepdim=True).expand(-1, -1, 8), local], dim=1)
        reference = reference_net.second_conv(both).amax(dim=2)
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-4)


def test_features_concatenate_normed_blocks_3_7_11_with_pos_added_each_block() -> None:
    model = narrow().eval()
    model.load_state_dict(randomise(model, 1))
    groups, centres = torch.randn(10, 8, 3) * 0.05, torch.randn(10, 3)
    with torch.no_grad():
        out = model(groups, centres)
        x, pos, expected = model.encoder(groups)[None], model.pos_embed(centres)[None], []
        for i, block in enumerate(model.blocks.blocks):
            x = block(x + pos)
            if i in (3, 7, 11):
                expected.append(model.norm(x)[0])
    assert out.shape == (10, 3 * DIM)
    torch.testing.assert_close(out, torch.cat(expected, dim=1))


def test_official_checkpoint_loads_and_extract_matches_manual_pipeline(tmp_path: Path) -> None:
    state = randomise(narrow(), 2)
    torch.save(official_checkpoint(state), tmp_path / "pretrain.pth")
    model = narrow()
    load_pointmae_weights(model, tmp_path / "pretrain.pth")
    for key, value in state.items():
        assert torch.equal(model.state_dict()[key], value), key
    extractor = PointMaeExtractor(model, SMALL, "test")
    xyz, valid = cloud()
    result = extractor.extract(xyz, valid)

    points = torch.from_numpy(xyz[valid])
    groups, centres = group_points(points, 16, 8)
    direct = narrow().eval()
    direct.load_state_dict(state)
    with torch.no_grad():
        expected = direct(groups, centres)
    neighbors, weights = three_nn_weights(points, centres)
    torch.testing.assert_close(result.features, expected)
    assert torch.equal(result.neighbors, neighbors) and torch.equal(result.weights, weights)
    assert result.pixel_index.tolist() == np.flatnonzero(valid).tolist()
    assert result.features.dtype == torch.float32 and result.pixel_index.dtype == torch.int64
    assert result.grid_size == 16 and extractor.out_channels == 3 * DIM
    second = extractor.extract(xyz, valid)
    assert torch.equal(second.features, result.features) and torch.equal(second.weights, result.weights)


def test_unknown_and_missing_keys_are_listed(tmp_path: Path) -> None:
    state = randomise(narrow(), 3)
    del state["norm.bias"]
    checkpoint = official_checkpoint(state)
    checkpoint["base_model"]["module.MAE_encoder.cls_token"] = torch.zeros(1, 1, DIM)
    torch.save(checkpoint, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as info:
        load_pointmae_weights(narrow(), tmp_path / "bad.pth")
    assert info.value.missing == ["norm.bias"] and info.value.unexpected == ["cls_token"]
    assert "norm.bias" in str(info.value) and "cls_token" in str(info.value)


def test_pruned_encoder_loads_full_checkpoint_and_matches_full_model_layers(tmp_path: Path) -> None:
    state = randomise(narrow(), 4)
    torch.save(official_checkpoint(state), tmp_path / "pretrain.pth")
    pruned = narrow(4, (1, 2, 3))
    load_pointmae_weights(pruned, tmp_path / "pretrain.pth")
    full = narrow(12, (1, 2, 3)).eval()
    full.load_state_dict(state)
    groups, centres = torch.randn(6, 8, 3) * 0.05, torch.randn(6, 3)
    with torch.no_grad():
        torch.testing.assert_close(pruned.eval()(groups, centres), full(groups, centres))


def test_pruned_presets_use_official_layers_and_keep1_is_384_wide() -> None:
    assert [POINTMAE_PRESETS[n].layers for n in ("pointmae", "pointmae_keep8", "pointmae_keep4")] == [
        (3, 7, 11),
        (1, 4, 7),
        (1, 2, 3),
    ]
    tiny = POINTMAE_PRESETS["pointmae_keep1"]
    extractor = PointMaeExtractor(PointMaeEncoder(tiny.keep_blocks, tiny.layers), tiny, "random")
    assert extractor.out_channels == 384 and len(extractor.model.blocks.blocks) == 1


def test_small_and_empty_clouds_are_handled() -> None:
    extractor = PointMaeExtractor(narrow(), SMALL, "random")
    xyz, _ = cloud()
    few = np.zeros((16, 16), bool)
    few[5, 3:8] = True  # 5 points < 16 groups, < 8 points per group
    result = extractor.extract(xyz, few)
    assert result.features.shape == (5, 3 * DIM) and result.neighbors.shape == (5, 3)
    empty = extractor.extract(xyz, np.zeros((16, 16), bool))
    assert empty.features.shape == (0, 3 * DIM) and empty.pixel_index.numel() == 0
    assert torch.count_nonzero(empty.to_grid(4)) == 0


def test_bad_inputs_raise_value_errors() -> None:
    extractor = PointMaeExtractor(narrow(), SMALL, "random")
    xyz, valid = cloud()
    with pytest.raises(ValueError, match="square organized cloud"):
        extractor.extract(xyz[:, :8], valid[:, :8])
    with pytest.raises(ValueError, match="bool valid mask"):
        extractor.extract(xyz, valid.astype(np.uint8))
    bad = xyz.copy()
    bad[8, 8] = np.nan
    with pytest.raises(ValueError, match="finite"):
        extractor.extract(bad, valid)


def test_parameter_names_and_shapes_match_the_released_checkpoint() -> None:
    state = PointMaeEncoder(1, (0,)).state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert shapes["encoder.first_conv.0.weight"] == (128, 3, 1)
    assert shapes["encoder.first_conv.3.weight"] == (256, 128, 1)
    assert shapes["encoder.second_conv.0.weight"] == (512, 512, 1)
    assert shapes["encoder.second_conv.3.weight"] == (384, 512, 1)
    assert shapes["pos_embed.0.weight"] == (128, 3) and shapes["pos_embed.2.weight"] == (384, 128)
    assert shapes["blocks.blocks.0.attn.qkv.weight"] == (1152, 384)
    assert "blocks.blocks.0.attn.qkv.bias" not in shapes  # qkv_bias=False in Point-MAE
    assert shapes["blocks.blocks.0.mlp.fc1.weight"] == (1536, 384) and shapes["norm.weight"] == (384,)
    assert "encoder.first_conv.1.running_var" in shapes
