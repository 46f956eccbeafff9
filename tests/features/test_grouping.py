"""Grouping: FPS against a brute-force reference and the compiled package, kNN ties, 3-NN weights by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmiad.features import grouping
from mmiad.features.grouping import farthest_point_sample, group_points, knn_indices, three_nn_weights


def brute_force_fps(points: np.ndarray, count: int) -> list[int]:
    """Textbook FPS in plain Python: start at 0, take the point farthest from the chosen set, last index on ties."""
    pts = points.astype(np.float32)
    chosen = [0]
    nearest = [float("inf")] * len(pts)
    for _ in range(1, count):
        last = pts[chosen[-1]]
        best, best_i = -1.0, -1
        for i, p in enumerate(pts):
            d = np.float32(p[0] - last[0]) ** 2 + np.float32(p[1] - last[1]) ** 2 + np.float32(p[2] - last[2]) ** 2
            nearest[i] = min(nearest[i], float(d))
            if nearest[i] >= best:
                best, best_i = nearest[i], i
        chosen.append(best_i)
    return chosen


def grid_cloud() -> np.ndarray:
    """Integer lattice: many exactly tied distances."""
    axes = np.meshgrid(np.arange(6), np.arange(5), np.arange(3), indexing="ij")
    return np.stack(axes, axis=-1).reshape(-1, 3).astype(np.float32) * 0.01


@pytest.mark.parametrize("backend", ["numpy", "torch", "auto"] + (["fpsample"] if grouping.HAS_FPSAMPLE else []))
def test_fps_matches_brute_force_on_random_and_tied_clouds(backend: str) -> None:
    rng = np.random.default_rng(1)
    random_cloud = rng.normal(size=(150, 3)).astype(np.float32)
    for cloud, count in ((random_cloud, 40), (grid_cloud(), 60)):
        expected = brute_force_fps(cloud, count)
        assert farthest_point_sample(cloud, count, backend=backend).tolist() == expected


def test_fps_exhausted_duplicates_repeat_last_index() -> None:
    cloud = np.repeat(np.eye(3, dtype=np.float32), 2, axis=0)  # 3 distinct points, each twice
    # 0, then the last copy of each other point, then all distances are 0 and the last index (5) wins.
    assert farthest_point_sample(cloud, 5, backend="numpy").tolist() == [0, 5, 3, 5, 5]


@pytest.mark.skipif(not grouping.HAS_FPSAMPLE, reason="optional package fpsample is not installed")
def test_fpsample_and_fallback_give_identical_indices() -> None:
    rng = np.random.default_rng(2)
    clouds = [
        rng.normal(size=(5000, 3)).astype(np.float32) * 0.05 + 0.5,
        grid_cloud(),
        np.repeat(rng.normal(size=(40, 3)).astype(np.float32), 3, axis=0),
    ]
    for cloud in clouds:
        count = min(200, len(cloud))
        fast = farthest_point_sample(cloud, count, backend="fpsample")
        slow = farthest_point_sample(cloud, count, backend="numpy")
        np.testing.assert_array_equal(fast, slow)


def test_fps_rejects_bad_counts() -> None:
    cloud = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match="cannot sample 5"):
        farthest_point_sample(cloud, 5)
    with pytest.raises(ValueError, match=r"\(N,3\)"):
        farthest_point_sample(np.zeros((4, 2), np.float32), 2)


def test_knn_matches_stable_argsort_and_breaks_ties_by_index() -> None:
    rng = np.random.default_rng(3)
    points = torch.from_numpy(np.concatenate([grid_cloud(), rng.normal(size=(30, 3)).astype(np.float32) * 0.02]))
    queries = points[[0, 7, 33, 95]]
    idx, dist = knn_indices(points, queries, 9)
    full = ((queries[:, None].double() - points[None].double()) ** 2).sum(-1)
    for row in range(len(queries)):
        # Stable sort of (rounded) exact distances: ascending distance, then ascending index on ties.
        expected = np.argsort(np.round(full[row].numpy(), 12), kind="stable")[:9]
        assert idx[row].tolist() == expected.tolist()
        np.testing.assert_allclose(dist[row].numpy(), full[row, expected].numpy(), rtol=1e-5, atol=1e-9)


def test_knn_tie_at_boundary_prefers_lower_indices() -> None:
    # Query at the origin; points 1..4 all at distance 1: k=3 must take 0 (itself), then 1 and 2.
    points = torch.tensor([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [-1, 0, 0]], dtype=torch.float32)
    idx, _ = knn_indices(points, points[:1], 3)
    assert idx.tolist() == [[0, 1, 2]]


def test_group_points_centres_neighbourhoods_and_clamps_small_clouds() -> None:
    rng = np.random.default_rng(4)
    points = torch.from_numpy(rng.normal(size=(50, 3)).astype(np.float32))
    groups, centres = group_points(points, 8, 5)
    assert groups.shape == (8, 5, 3) and centres.shape == (8, 3)
    assert torch.equal(centres, points[torch.from_numpy(farthest_point_sample(points.numpy(), 8))])
    idx, _ = knn_indices(points, centres, 5)
    torch.testing.assert_close(groups, points[idx] - centres[:, None])
    assert torch.all(groups[:, 0] == 0)  # each centre is its own nearest neighbour

    small_groups, small_centres = group_points(points[:4], 8, 5)
    assert small_groups.shape == (4, 4, 3) and small_centres.shape == (4, 3)


def test_three_nn_weights_hand_computed() -> None:
    centres = torch.tensor([[0, 0, 0], [1, 0, 0], [0, 2, 0], [0, 0, 3]], dtype=torch.float32)
    points = torch.tensor([[0.5, 0, 0], [0, 0, 3]], dtype=torch.float32)
    neighbors, weights = three_nn_weights(points, centres)
    # Point 0: d² = 0.25, 0.25, 4.25, 9.25 → centres 0, 1, 2 with weights ∝ 4, 4, 1/4.25.
    raw = np.array([1 / (0.25 + 1e-8), 1 / (0.25 + 1e-8), 1 / (4.25 + 1e-8)])
    assert neighbors[0].tolist() == [0, 1, 2]
    np.testing.assert_allclose(weights[0].numpy(), raw / raw.sum(), rtol=1e-6)
    # Point 1 sits on centre 3: d² = 0 dominates (1e8 against ≤ 1/9), the others follow by distance.
    assert neighbors[1].tolist() == [3, 0, 1]
    np.testing.assert_allclose(weights[1].numpy(), [1.0, 1 / 9 * 1e-8, 1 / 10 * 1e-8], rtol=1e-4, atol=1e-12)


def test_three_nn_with_fewer_centres_uses_all() -> None:
    centres = torch.tensor([[0, 0, 0], [2, 0, 0]], dtype=torch.float32)
    neighbors, weights = three_nn_weights(torch.tensor([[0.5, 0, 0]]), centres)
    assert neighbors.tolist() == [[0, 1]]
    np.testing.assert_allclose(weights[0].numpy(), [0.9, 0.1], rtol=1e-6)  # ∝ 1/0.25, 1/2.25


@pytest.mark.parametrize("k", [1, 3, 16])
def test_kdtree_knn_equals_the_brute_force(k: int) -> None:

    rng = np.random.default_rng(k)
    random_cloud = torch.from_numpy(rng.random((3000, 3), dtype=np.float32) * 0.05)
    lattice = torch.from_numpy(np.stack(np.meshgrid(*[np.arange(12)] * 3), -1).reshape(-1, 3).astype(np.float32))
    for points in (random_cloud, lattice, torch.cat([random_cloud[:500], random_cloud[:500]])):
        queries = points[torch.from_numpy(rng.choice(len(points), 200, replace=False))] + 1e-4
        fast_idx, fast_dist = knn_indices(points, queries, k, backend="kdtree")
        slow_idx, slow_dist = knn_indices(points, queries, k, backend="brute")
        assert torch.equal(fast_idx, slow_idx)
        assert torch.equal(fast_dist, slow_dist)
