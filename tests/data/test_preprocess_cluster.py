"""Grid DBSCAN against sklearn, and largest-cluster cleaning of organized clouds."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import cKDTree
from sklearn.cluster import DBSCAN

from mmiad.data.preprocess.cluster import dbscan_labels, keep_largest_cluster


def _canonical(labels: np.ndarray) -> np.ndarray:
    """Relabel clusters by order of first appearance (noise stays -1) so partitions compare with ==."""
    out = np.full_like(labels, -1)
    seen: dict[int, int] = {}
    for i, label in enumerate(labels.tolist()):
        if label >= 0:
            out[i] = seen.setdefault(label, len(seen))
    return out


def _blobs(seed: int) -> np.ndarray:
    """Four well separated blobs of different density plus sparse noise, shuffled."""
    rng = np.random.default_rng(seed)
    parts = [
        rng.normal((0.0, 0.0, 0.0), 0.004, (400, 3)),
        rng.normal((0.1, 0.0, 0.0), 0.003, (250, 3)),
        rng.normal((0.0, 0.1, 0.05), 0.002, (90, 3)),
        rng.normal((0.1, 0.1, 0.1), 0.002, (35, 3)),
        rng.uniform(-0.05, 0.15, (60, 3)),
    ]
    points = np.concatenate(parts)
    return points[rng.permutation(len(points))]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("eps", "min_points"), [(0.006, 30), (0.004, 10), (0.01, 5)])
def test_labels_match_sklearn_exactly_on_separated_clusters(seed: int, eps: float, min_points: int) -> None:
    points = _blobs(seed)
    expected = DBSCAN(eps=eps, min_samples=min_points).fit(points).labels_
    labels = dbscan_labels(points, eps=eps, min_points=min_points)
    assert labels.max() >= 1  # several clusters really are found
    np.testing.assert_array_equal(_canonical(labels), _canonical(expected))
    np.testing.assert_array_equal(labels, _canonical(labels))  # clusters numbered by their first point


@pytest.mark.parametrize("seed", [3, 4])
def test_core_points_and_noise_match_sklearn_on_touching_clusters(seed: int) -> None:
    """Where blobs overlap, border points may legitimately go either way; everything else must be identical."""
    rng = np.random.default_rng(seed)
    points = np.concatenate(
        [
            rng.normal((0, 0, 0), 0.01, (300, 3)),
            rng.normal((0.03, 0, 0), 0.008, (200, 3)),
            rng.uniform(-0.05, 0.1, (80, 3)),
        ]
    )
    eps, min_points = 0.006, 10
    reference = DBSCAN(eps=eps, min_samples=min_points).fit(points)
    labels = dbscan_labels(points, eps=eps, min_points=min_points)
    core = np.zeros(len(points), dtype=bool)
    core[reference.core_sample_indices_] = True
    np.testing.assert_array_equal(labels == -1, reference.labels_ == -1)
    np.testing.assert_array_equal(_canonical(labels[core]), _canonical(reference.labels_[core]))
    tree = cKDTree(points[core])
    for index in np.flatnonzero(~core & (labels >= 0)):
        near = tree.query_ball_point(points[index], eps)
        assert labels[index] in set(labels[core][near].tolist())


def test_labels_of_empty_and_all_noise_clouds() -> None:
    assert dbscan_labels(np.zeros((0, 3))).shape == (0,)
    sparse = np.arange(30, dtype=np.float64)[:, None] * np.array([[0.1, 0.0, 0.0]])
    assert (dbscan_labels(sparse, eps=0.006, min_points=2) == -1).all()


def _organized(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A flat 1 mm grid at z = 0.5 with every point invalid; callers switch regions on."""
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    xyz = np.stack([cols * 0.001, rows * 0.001, np.full(shape, 0.5, dtype=np.float32)], axis=-1)
    return xyz, np.zeros(shape, dtype=bool)


def test_keep_largest_cluster_drops_small_blob_and_isolated_noise() -> None:
    xyz, valid = _organized((60, 80))
    big = np.zeros_like(valid)
    big[5:40, 5:45] = True
    small = np.zeros_like(valid)
    small[45:52, 60:70] = True  # 70 points: a cluster of its own, 15 mm from the big one
    valid |= big | small
    for r, c in [(2, 70), (55, 2), (50, 30)]:  # isolated points, far from everything
        valid[r, c] = True
    xyz[50, 30, 2] = 0.45
    xyz = np.where(valid[..., None], xyz, 0)
    before = xyz.copy()
    cleaned, kept = keep_largest_cluster(xyz, valid)
    np.testing.assert_array_equal(kept, big)
    np.testing.assert_array_equal(cleaned[big], xyz[big])
    assert (cleaned[~big] == 0).all()
    np.testing.assert_array_equal(xyz, before)


def test_keep_largest_cluster_breaks_ties_by_raster_order() -> None:
    xyz, valid = _organized((40, 60))
    valid[20:30, 35:45] = True  # same size, but first in raster order is the one at row 5
    valid[5:15, 5:15] = True
    _, kept = keep_largest_cluster(np.where(valid[..., None], xyz, 0), valid)
    assert kept[5:15, 5:15].all()
    assert kept.sum() == 100


def test_keep_largest_cluster_returns_nothing_when_all_points_are_noise() -> None:
    xyz, valid = _organized((40, 40))
    valid[::20, ::20] = True
    _, kept = keep_largest_cluster(np.where(valid[..., None], xyz, 0), valid)
    assert not kept.any()
