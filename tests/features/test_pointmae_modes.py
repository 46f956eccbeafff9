"""Point-MAE as the official scripts run it: BatchNorm with the cloud's statistics, DropPath, which points count.

The reference below is the official forward (``full_models.py``: ``Encoder``, ``Block``, ``PointTransformer``)
re-derived with plain torch ops from the released parameter layout: the Mini-PointNet as Conv1d layers with real
``nn.BatchNorm1d`` modules applied to the whole (B·G, C, K) tensor at once, attention with an explicit softmax,
DropPath as per-branch factors. Nothing in it calls mmiad's encoder.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmiad.features.pointmae as pointmae
from mmiad.features.cache import FeatureCache
from mmiad.features.fpfh import FPFHExtractor
from mmiad.features.grouping import group_points
from mmiad.features.pointmae import (
    PointMaeEncoder,
    PointMaeExtractor,
    PointMaePreset,
    drop_path_rates,
    sample_drop_path,
)
from mmiad.features.registry import EXTRACTOR_PRESETS, build_extractors, build_pipeline
from mmiad.features.weights import build_point_extractor

DIM, HEADS = 32, 2
LAYERS = (3, 7, 11)
SMALL = PointMaePreset("small", num_group=12, group_size=8, keep_blocks=12, layers=LAYERS)


def random_state(seed: int, *, conv2_bias_shift: float = 0.0) -> dict[str, torch.Tensor]:
    """Every tensor random; BatchNorm affine far from identity and running statistics far from the cloud's."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in PointMaeEncoder(12, LAYERS, dim=DIM, num_heads=HEADS).state_dict().items():
        if key.endswith("num_batches_tracked"):
            state[key] = value
        elif key.endswith("running_var"):
            state[key] = torch.rand(value.shape, generator=generator) * 4 + 0.5
        elif key.endswith("running_mean"):
            state[key] = torch.randn(value.shape, generator=generator) * 2
        else:
            state[key] = torch.randn(value.shape, generator=generator) * 0.3
    state["encoder.second_conv.0.bias"] = state["encoder.second_conv.0.bias"] + conv2_bias_shift
    return state


def encoder(state: dict[str, torch.Tensor], batchnorm: str = "cloud") -> PointMaeEncoder:
    model = PointMaeEncoder(12, LAYERS, dim=DIM, num_heads=HEADS, batchnorm=batchnorm)
    model.load_state_dict(state)
    return model.eval()


def _batchnorm(state: dict[str, torch.Tensor], prefix: str, train: bool) -> nn.BatchNorm1d:
    """A real ``nn.BatchNorm1d`` holding the checkpoint's tensors, in training or eval mode."""
    channels = state[prefix + "weight"].shape[0]
    bn = nn.BatchNorm1d(channels)
    bn.load_state_dict({k[len(prefix) :]: v.clone() for k, v in state.items() if k.startswith(prefix)})
    return bn.train(train)


def official_forward(
    state: dict[str, torch.Tensor],
    groups: torch.Tensor,
    centres: torch.Tensor,
    *,
    train_bn: bool,
    factors: list[tuple[float, float]] | None = None,
) -> torch.Tensor:
    """The official PointTransformer forward for one cloud (B = 1), returning (G, 3·DIM)."""
    s = state
    batch, count, size = 1, groups.shape[0], groups.shape[1]
    # Encoder.forward: (B·G, 3, K) through first_conv, global max, concat, second_conv, max.
    x = groups.reshape(batch * count, size, 3).transpose(2, 1)
    x = F.conv1d(x, s["encoder.first_conv.0.weight"], s["encoder.first_conv.0.bias"])
    x = F.relu(_batchnorm(s, "encoder.first_conv.1.", train_bn)(x))
    x = F.conv1d(x, s["encoder.first_conv.3.weight"], s["encoder.first_conv.3.bias"])
    x = torch.cat([torch.max(x, dim=2, keepdim=True)[0].expand(-1, -1, size), x], dim=1)
    x = F.conv1d(x, s["encoder.second_conv.0.weight"], s["encoder.second_conv.0.bias"])
    x = F.relu(_batchnorm(s, "encoder.second_conv.1.", train_bn)(x))
    x = F.conv1d(x, s["encoder.second_conv.3.weight"], s["encoder.second_conv.3.bias"])
    x = torch.max(x, dim=2)[0].reshape(batch, count, DIM)
    pos = F.linear(centres, s["pos_embed.0.weight"], s["pos_embed.0.bias"])
    pos = F.linear(F.gelu(pos), s["pos_embed.2.weight"], s["pos_embed.2.bias"])[None]
    factors = factors or [(1.0, 1.0)] * 12
    head = DIM // HEADS
    picked = []
    for i in range(12):
        p = f"blocks.blocks.{i}."
        x = x + pos
        h = F.layer_norm(x, (DIM,), s[p + "norm1.weight"], s[p + "norm1.bias"], eps=1e-5)
        q, k, v = F.linear(h, s[p + "attn.qkv.weight"]).reshape(batch, count, 3, HEADS, head).permute(2, 0, 3, 1, 4)
        attn = torch.softmax((q * head**-0.5) @ k.transpose(-2, -1), dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(batch, count, DIM)
        x = x + factors[i][0] * F.linear(out, s[p + "attn.proj.weight"], s[p + "attn.proj.bias"])
        h = F.layer_norm(x, (DIM,), s[p + "norm2.weight"], s[p + "norm2.bias"], eps=1e-5)
        h = F.linear(F.gelu(F.linear(h, s[p + "mlp.fc1.weight"], s[p + "mlp.fc1.bias"])), s[p + "mlp.fc2.weight"])
        x = x + factors[i][1] * (h + s[p + "mlp.fc2.bias"])
        if i in LAYERS:
            picked.append(F.layer_norm(x, (DIM,), s["norm.weight"], s["norm.bias"], eps=1e-5)[0])
    return torch.cat(picked, dim=-1)


def random_groups(count: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, size, 3, generator=generator) * 0.05, torch.randn(count, 3, generator=generator)


def organized_cloud(size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """A bumpy patch; row 5 lies exactly on the plane x = 0 (as a rendering's centre column can)."""
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32)
    xyz = np.stack([(rows - 5) * 0.004, (cols - 7.5) * 0.004, 0.5 + 0.01 * np.sin(rows * cols / 9.0)], axis=-1)
    return xyz.astype(np.float32), np.ones((size, size), bool)


@pytest.mark.parametrize("chunk", [7, 10_000])  # 20 groups in three uneven chunks, and in one
def test_cloud_batchnorm_equals_official_training_mode_forward(monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    monkeypatch.setattr(pointmae, "_GROUP_CHUNK", chunk)
    state = random_state(0)
    groups, centres = random_groups(20, 8, 1)
    with torch.no_grad():
        got = encoder(state)(groups, centres)
        expected = official_forward(state, groups, centres, train_bn=True)
        eval_mode = official_forward(state, groups, centres, train_bn=False)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert (got - eval_mode).abs().max() > 0.1  # the two BatchNorm modes really differ on these weights


def test_running_batchnorm_equals_official_eval_mode_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pointmae, "_GROUP_CHUNK", 7)
    state = random_state(2)
    groups, centres = random_groups(20, 8, 3)
    with torch.no_grad():
        got = encoder(state, "running")(groups, centres)
        expected = official_forward(state, groups, centres, train_bn=False)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shift", [0.0, 300.0])
def test_chunks_do_not_change_the_statistics(monkeypatch: pytest.MonkeyPatch, shift: float) -> None:
    """Chunked (3 groups at a time) against one chunk, both against the official Sequentials in float64.

    A hidden-layer bias of 300 makes every channel's mean hundreds of times its spread, where sums of squares in
    float32 would lose the variance. Float32 activations near 300 carry rounding of ~2e-5 themselves, so both
    paths are held to the float64 truth, and chunking may not be meaningfully less accurate than one chunk.
    """
    state = random_state(4, conv2_bias_shift=shift)
    model = encoder(state)
    groups, _ = random_groups(23, 8, 5)
    with torch.no_grad():
        monkeypatch.setattr(pointmae, "_GROUP_CHUNK", 10_000)
        whole = model.encoder(groups)
        monkeypatch.setattr(pointmae, "_GROUP_CHUNK", 3)
        chunked = model.encoder(groups)
        reference_net = encoder(state).encoder.double().train()
        local = reference_net.first_conv(groups.double().transpose(2, 1))
        both = torch.cat([local.amax(dim=2, keepdim=True).expand(-1, -1, 8), local], dim=1)
        truth = reference_net.second_conv(both).amax(dim=2)
    chunked_error = float((chunked.double() - truth).abs().max())
    whole_error = float((whole.double() - truth).abs().max())
    assert chunked_error < (1e-4 if shift else 2e-5)
    assert chunked_error <= 2 * whole_error + 1e-6
    if not shift:
        torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)


def test_forward_ignores_the_module_train_flag() -> None:
    state = random_state(6)
    groups, centres = random_groups(10, 8, 7)
    model = encoder(state)
    with torch.no_grad():
        evaluated = model.eval()(groups, centres)
        trained = model.train()(groups, centres)
    assert torch.equal(evaluated, trained)
    assert torch.equal(model.encoder.first_conv[1].running_mean, state["encoder.first_conv.1.running_mean"])


def test_sampled_drop_path_equals_reference_with_the_drawn_factors() -> None:
    state = random_state(8)
    groups, centres = random_groups(10, 8, 9)
    factors = sample_drop_path(drop_path_rates(12), torch.Generator().manual_seed(11))
    assert any(f == 0.0 for pair in factors for f in pair)  # this seed drops at least one branch
    with torch.no_grad():
        got = encoder(state)(groups, centres, torch.Generator().manual_seed(11))
        expected = official_forward(state, groups, centres, train_bn=True, factors=factors)
        identity = encoder(state)(groups, centres)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert (got - identity).abs().max() > 1e-2


def test_drop_path_draws_follow_the_official_rates() -> None:
    rates = drop_path_rates(12)
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1) and len(rates) == 12
    assert drop_path_rates(4) == rates[:4]  # pruning keeps the first blocks' rates, as CFM prunes after building
    generator = torch.Generator().manual_seed(0)
    draws = torch.tensor([sample_drop_path(rates, generator) for _ in range(4000)])  # (4000, 12, 2)
    assert torch.all(draws[:, 0] == 1.0)  # rate 0: no DropPath
    for i in range(1, 12):
        keep = 1 - rates[i]
        values = sorted(set(draws[:, i].flatten().tolist()))
        assert values == [0.0, pytest.approx(1 / keep)]
        dropped = float((draws[:, i] == 0).double().mean())
        assert abs(dropped - rates[i]) < 4 * math.sqrt(rates[i] * keep / 8000)


def test_sampled_extractor_is_deterministic_per_seed_and_cloud_order_free() -> None:
    state = random_state(10)
    xyz, valid = organized_cloud()
    other = xyz.copy()
    other[..., 2] += 0.01 * np.cos(np.arange(16))[None, :]

    def extractor(drop_path: str, seed: int = 0) -> PointMaeExtractor:
        return PointMaeExtractor(encoder(state), SMALL, "test", drop_path=drop_path, drop_path_seed=seed)

    first = extractor("sampled", 3)
    a = first.extract(xyz, valid).features
    first.extract(other, valid)
    assert torch.equal(first.extract(xyz, valid).features, a)  # same cloud, same draws, whatever came between
    fresh = extractor("sampled", 3)
    fresh.extract(other, valid)
    assert torch.equal(fresh.extract(xyz, valid).features, a)
    assert not torch.equal(extractor("sampled", 4).extract(xyz, valid).features, a)
    expected = extractor("expected").extract(xyz, valid).features
    assert (a - expected).abs().max() > 1e-2
    assert first.config()["drop_path"] == "sampled" and first.config()["drop_path_seed"] == 3
    assert "drop_path_seed" not in extractor("expected").config()


def test_expected_drop_path_extractor_equals_official_forward_on_its_groups() -> None:
    state = random_state(12)
    xyz, valid = organized_cloud()
    got = PointMaeExtractor(encoder(state), SMALL, "test").extract(xyz, valid)
    points = torch.from_numpy(xyz.reshape(-1, 3)[got.pixel_index.numpy()])
    groups, centres = group_points(points, 12, 8)
    with torch.no_grad():
        expected = official_forward(state, groups, centres, train_bn=True)
    torch.testing.assert_close(got.features, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("count", [1, 2, 3])
def test_tiny_and_degenerate_clouds_give_finite_features(count: int) -> None:
    state = random_state(14)
    xyz, _ = organized_cloud()
    xyz[2, 3:6] = xyz[2, 3]  # three identical points: every variance is exactly zero
    valid = np.zeros((16, 16), bool)
    valid[2, 3 : 3 + count] = True
    for batchnorm in ("cloud", "running"):
        result = PointMaeExtractor(encoder(state, batchnorm), SMALL, "test").extract(xyz, valid)
        assert result.features.shape == (count, 3 * DIM) and torch.isfinite(result.features).all()
    if count >= 2:  # official nn.BatchNorm1d needs more than one value per channel; then both must agree
        # With zero variance, BatchNorm divides float32 rounding of (x - mean) by sqrt(eps) ≈ 3e-3: 1e-3 tolerance.
        groups = torch.zeros(count, count, 3)
        centres = torch.from_numpy(np.repeat(xyz[2, 3][None], count, axis=0))
        with torch.no_grad():
            torch.testing.assert_close(
                encoder(state)(groups, centres),
                official_forward(state, groups, centres, train_bn=True),
                rtol=1e-3,
                atol=1e-3,
            )


def test_official_point_rule_drops_points_on_a_coordinate_plane() -> None:
    state = random_state(16)
    xyz, valid = organized_cloud()
    valid[0, :4] = False
    official = np.flatnonzero(valid.reshape(-1) & np.all(xyz.reshape(-1, 3) != 0, axis=1))
    assert len(official) == valid.sum() - 16  # row 5 (x = 0) is out

    strict = PointMaeExtractor(encoder(state), SMALL, "test").extract(xyz, valid)
    assert strict.pixel_index.tolist() == official.tolist()
    reduced = np.zeros(256, bool)
    reduced[official] = True
    loose = PointMaeExtractor(encoder(state), SMALL, "test", nonzero="any")
    assert torch.equal(loose.extract(xyz, reduced.reshape(16, 16)).features, strict.features)
    anyrule = loose.extract(xyz, valid)
    assert anyrule.pixel_index.tolist() == np.flatnonzero(valid).tolist()
    assert not torch.equal(anyrule.features, strict.features)
    assert strict.dense()[:, 5].abs().sum() == 0 and anyrule.dense()[:, 5].abs().sum() > 0

    fpfh_strict = FPFHExtractor(feature_radius=0.02, normal_radius=0.01).extract(xyz, valid)
    fpfh_any = FPFHExtractor(feature_radius=0.02, normal_radius=0.01, nonzero="any").extract(xyz, valid)
    assert fpfh_strict.pixel_index.tolist() == official.tolist()
    assert fpfh_any.pixel_index.tolist() == np.flatnonzero(valid).tolist()
    assert fpfh_strict.features.shape[0] == len(official)


def test_every_pointmae_preset_defaults_to_the_official_modes() -> None:
    deep = [p for p in EXTRACTOR_PRESETS.values() if p.point.startswith("pointmae")]
    assert {p.name for p in deep} >= {"dino-pointmae", "dino-pointmae-m", "dino-pointmae-s", "dino-pointmae-t"}
    with pytest.warns(UserWarning, match="RANDOM"):
        for point in sorted({p.point for p in deep}):
            config = build_point_extractor(point, random_init=True, num_group=4, group_size=4).config()
            assert (config["batchnorm"], config["drop_path"], config["nonzero"]) == ("cloud", "expected", "all")


def test_point_options_reach_the_extractor_config_and_the_cache_key(tmp_path: Path) -> None:
    files = [tmp_path / "a.bin"]
    files[0].write_bytes(b"sample")
    configs = [
        build_pipeline("weightfree", profile="cfm", cache_dir=tmp_path, point_options=options).config()
        for options in (None, {"nonzero": "all"}, {"nonzero": "any"})
    ]
    keys = {FeatureCache.key(files, config) for config in configs}
    assert len(keys) == 2  # the default is "all"; "any" is another cache entry
    with pytest.warns(UserWarning, match="RANDOM"):
        _, point = build_extractors(
            "dino-pointmae-t", random_init=True, point_options={"batchnorm": "running", "nonzero": "any"}
        )
    assert point.config()["batchnorm"] == "running" and point.config()["nonzero"] == "any"
    _, fpfh = build_extractors("weightfree", point_options={"nonzero": "any"})
    assert fpfh.config()["nonzero"] == "any"
    with pytest.raises(ValueError, match="do not apply"):
        build_extractors("weightfree", point_options={"batchnorm": "running"})
    with pytest.raises(ValueError, match="batchnorm"):
        PointMaeEncoder(1, (0,), dim=DIM, num_heads=HEADS, batchnorm="train")
    with pytest.raises(ValueError, match="drop_path"):
        PointMaeExtractor(PointMaeEncoder(12, LAYERS, dim=DIM, num_heads=HEADS), SMALL, "x", drop_path="on")
    with pytest.raises(ValueError, match="nonzero"):
        FPFHExtractor(nonzero="none")
