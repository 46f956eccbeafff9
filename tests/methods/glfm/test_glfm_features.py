"""GLFM's features: the two-step smoothing against brute force, and the released adapted checkpoint's import."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mmiad.features.grouping import regroup_mean
from mmiad.features.pointmae import PointMaeEncoder, load_pointmae_weights
from mmiad.features.weights import build_point_extractor


def _organized(size: int = 24, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(np.linspace(-0.02, 0.02, size), np.linspace(-0.02, 0.02, size)), axis=-1)
    z = 0.3 + 0.002 * rng.standard_normal((size, size))
    xyz = np.concatenate([grid, z[..., None]], axis=-1).astype(np.float32)
    xyz[:3, :3] = 0.0  # a hole
    xyz[5, 5, 0] = 0.0  # one zero coordinate: dropped by the all-three rule
    return xyz, np.any(xyz != 0, axis=-1)


def test_regroup_mean_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    features = torch.from_numpy(rng.normal(size=(6, 5)).astype(np.float32))
    neighbors = torch.from_numpy(rng.integers(0, 6, size=(20, 3)))
    weights = torch.from_numpy(rng.dirichlet(np.ones(3), size=20).astype(np.float32))
    members = torch.from_numpy(rng.integers(0, 20, size=(6, 4)))
    expected = np.zeros((6, 5))
    for g in range(6):
        for p in members[g].tolist():
            expected[g] += (
                sum(float(weights[p, k]) * features[int(neighbors[p, k])].double().numpy() for k in range(3)) / 4
            )
    np.testing.assert_allclose(
        regroup_mean(features, neighbors, weights, members).numpy(), expected, rtol=1e-5, atol=1e-6
    )


def test_glfm_extractor_smooths_twice_over_the_nonzero_points() -> None:
    xyz, valid = _organized()
    options = {"random_init": True, "num_group": 8, "group_size": 10, "batchnorm": "running"}
    raw = build_point_extractor("pointmae_glfm", **options).extract_groups(xyz, valid)
    smoothed = build_point_extractor("pointmae_glfm", regroup=True, **options).extract(xyz, valid)
    assert raw.features.features.shape == (8, 768)  # blocks 0 and 1, 384 each
    assert 5 * 24 + 5 not in raw.features.pixel_index.tolist()  # the point with a zero coordinate is not used
    f, nb, w = raw.features.features.double(), raw.features.neighbors, raw.features.weights.double()
    propagated = torch.stack([(w[p, :, None] * f[nb[p]]).sum(0) for p in range(nb.shape[0])])
    expected = torch.stack([propagated[raw.member_idx[g]].mean(0) for g in range(8)])
    torch.testing.assert_close(smoothed.features.double(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(smoothed.pixel_index, raw.features.pixel_index)


def test_official_adapted_checkpoint_imports_skipping_the_head(tmp_path: Path) -> None:
    """``pointmae_adapted.pth``: a plain state_dict of all 12 blocks, BN statistics and ``classify.0.*``."""
    torch.manual_seed(3)
    full = PointMaeEncoder(12, (11,))
    state = {**full.state_dict(), "classify.0.weight": torch.randn(2, 384), "classify.0.bias": torch.zeros(2)}
    state["encoder.first_conv.1.running_mean"] = torch.randn(128)
    torch.save(state, tmp_path / "pointmae_adapted.pth")
    model = PointMaeEncoder(2, (0, 1), batchnorm="running")
    load_pointmae_weights(model, tmp_path / "pointmae_adapted.pth")
    torch.testing.assert_close(model.encoder.first_conv[1].running_mean, state["encoder.first_conv.1.running_mean"])
    torch.testing.assert_close(model.blocks.blocks[1].mlp.fc2.weight, state["blocks.blocks.1.mlp.fc2.weight"])

    from mmiad.methods.glfm import GLFM

    glfm = GLFM(weights_dir=str(tmp_path), adaptation="released", cache_dir=str(tmp_path / "cache"))
    extractor = glfm.pipeline.point_extractor
    torch.testing.assert_close(
        extractor.model.blocks.blocks[0].attn.qkv.weight, state["blocks.blocks.0.attn.qkv.weight"]
    )
    assert extractor.model.batchnorm == "running" and extractor.regroup
