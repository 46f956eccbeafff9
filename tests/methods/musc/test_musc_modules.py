"""MuSc-V2 SNAMD and IPG against loop references written from the official ``_SNAMD.py`` and ``_IPG.py``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmiad.methods.musc.ipg import curvature, iterative_groups, make_grouping
from mmiad.methods.musc.snamd import aggregate_2d, aggregate_3d


def _brute_snamd_2d(features: np.ndarray, r_list: tuple[int, ...]) -> np.ndarray:
    """Per patch, per degree r: exp(−distance)-weighted mean over the r×r window (zeros outside), then mean."""
    channels, height, width = features.shape
    r_max = max(r_list)
    pad = (r_max - 1) // 2
    out = np.zeros((height * width, channels))
    for y in range(height):
        for x in range(width):
            centre = features[:, y, x]
            per_degree = []
            for r in r_list:
                half = (r - 1) // 2
                total, weight_sum = np.zeros(channels), 0.0
                for dy in range(-half, half + 1):
                    for dx in range(-half, half + 1):
                        yy, xx = y + dy, x + dx
                        inside = 0 <= yy < height and 0 <= xx < width and abs(dy) <= pad and abs(dx) <= pad
                        value = features[:, yy, xx] if inside else np.zeros(channels)
                        weight = math.exp(-np.linalg.norm(value - centre))
                        total += weight * value
                        weight_sum += weight
                per_degree.append(total / weight_sum)
            out[y * width + x] = np.mean(per_degree, axis=0)
    return out


@pytest.mark.parametrize("r_list", [(1, 3, 5), (3,), (1,)])
def test_snamd_2d_matches_brute_force(r_list: tuple[int, ...]) -> None:
    features = torch.randn(4, 5, 6, generator=torch.Generator().manual_seed(0))
    result = aggregate_2d(features, r_list)
    expected = _brute_snamd_2d(features.double().numpy(), r_list)
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-5, atol=1e-6)


def _brute_snamd_3d(features, centres, bends, r_list, pool, threshold):
    count, channels = features.shape
    out = np.zeros_like(features)
    for g in range(count):
        order = sorted(range(count), key=lambda j: (np.linalg.norm(centres[j] - centres[g]), j))
        own = features[order[0]]
        per_degree = []
        for r in r_list:
            picked = order[:r]
            weights = [math.exp(-np.linalg.norm(features[j] - own)) for j in picked]
            per_degree.append(sum(w * features[j] for w, j in zip(weights, picked, strict=True)) / sum(weights))
        if pool == "degrees":
            low = np.mean(per_degree, axis=0)
        else:  # adaptive_avg_pool1d of the flattened [degree 1 | degree 3 | degree 5] vector back to C entries
            flat = np.concatenate(per_degree)
            depth = len(r_list)
            low = np.array([flat[c * depth : (c + 1) * depth].mean() for c in range(channels)])
        out[g] = low if bends[g] < threshold else own
    return out


@pytest.mark.parametrize("pool", ["official", "degrees"])
def test_snamd_3d_matches_brute_force(pool: str) -> None:
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(8, 6, generator=generator)
    features = features / features.norm(dim=1, keepdim=True)
    centres = torch.rand(8, 3, generator=generator)
    bends = torch.tensor([0.0, 0.02, 0.005, 0.5, 0.0, 0.001, 0.3, 0.009])
    result = aggregate_3d(features, centres, bends, (1, 3, 5), pool=pool)
    expected = _brute_snamd_3d(features.double().numpy(), centres.double().numpy(), bends, (1, 3, 5), pool, 0.01)
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-5, atol=1e-6)
    curved = bends >= 0.01
    torch.testing.assert_close(result[curved], features[curved])  # curved surface keeps its own token


def _ipg_loops(points: np.ndarray, centre: int, group_size: int, step: int, threshold: float):
    """Official iter_group for one centre, by loops over sets: returns (members as a sorted list, curvature)."""
    dists = np.linalg.norm(points - points[centre], axis=1)
    search = sorted(range(len(points)), key=lambda j: (dists[j], j))[: 2 * group_size]
    nearest = search[:group_size]
    offsets = points[nearest[1:]] - points[centre]
    offsets = offsets / np.linalg.norm(offsets, axis=1).max()
    offsets = offsets - offsets.mean(axis=0)
    eig = np.linalg.eigvalsh(offsets.T @ offsets / (group_size - 2))
    bend = eig[0] / eig.sum()
    if bend < threshold:
        return sorted(nearest), bend
    members = search[:step]
    while len(members) < group_size:
        add = min(step, group_size - len(members))
        support = [s for s in search if s not in members]
        pairs = sorted((np.linalg.norm(points[m] - points[s]), s) for m in members for s in support)
        members = [s for _, s in pairs[:add]] + members
    return sorted(members), bend


def test_ipg_grows_curved_groups_like_the_official_loop() -> None:
    generator = np.random.default_rng(0)
    flat = np.c_[generator.uniform(-1, 1, (60, 2)), np.zeros(60)]
    bent = generator.normal(size=(60, 3)) * 0.3 + [3, 0, 0]  # a blob: no flat neighbourhood anywhere
    points = np.vstack([flat, bent]).astype(np.float32)
    centres = torch.tensor([0, 7, 60, 75, 100])
    members, bends = iterative_groups(torch.from_numpy(points), centres, 16, step=5)
    assert (bends[:2] < 0.01).all() and (bends[2:] >= 0.01).all()
    for row, centre in enumerate(centres.tolist()):
        expected, bend = _ipg_loops(points.astype(np.float64), centre, 16, 5, 0.01)
        assert sorted(members[row].tolist()) == expected
        assert bends[row].item() == pytest.approx(bend, rel=1e-4, abs=1e-6)
    knn = _knn(torch.from_numpy(points), centres, 16)
    assert any(sorted(members[r].tolist()) != sorted(knn[r].tolist()) for r in range(2, 5))  # IPG did regroup


def test_grouping_hook_records_curvature_with_and_without_ipg() -> None:
    points = torch.from_numpy(np.random.default_rng(1).normal(size=(200, 3)).astype(np.float32))
    for use_ipg in (True, False):
        grouping = make_grouping(use_ipg, step=8)
        centre_idx, members = grouping(points, 10, 24)
        assert centre_idx.shape == (10,) and members.shape == (10, 24)
        assert centre_idx[0] == 0  # FPS starts at index 0, as the official CUDA kernel
        torch.testing.assert_close(grouping.curvature, curvature(points, _knn(points, centre_idx, 24)))


def _knn(points: torch.Tensor, centre_idx: torch.Tensor, k: int) -> torch.Tensor:
    dist = torch.cdist(points[centre_idx].double(), points.double())
    return torch.argsort(dist, dim=1, stable=True)[:, :k]
