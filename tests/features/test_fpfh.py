"""FPFH: held to a slow per-point transliteration of open3d's definition, to hand-derived cases, and to open3d."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmiad.features.base import PointFeatureExtractor
from mmiad.features.fpfh import (
    FPFHExtractor,
    estimate_normals,
    fpfh_features,
    open3d_available,
    smallest_eigenvectors,
)


def _bumpy_cloud(n: int, seed: int = 0) -> np.ndarray:
    """Randomly placed points on an asymmetric smooth surface a camera ~0.5 m away would see (metres)."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(-0.05, 0.05, size=(n, 2))
    z = 0.5 + 3.0 * xy[:, 0] ** 2 - 5.0 * xy[:, 1] ** 2 + 2.0 * xy[:, 0] * xy[:, 1] + 0.4 * xy[:, 0] ** 3 * 100
    return np.column_stack([xy, z])


def _reference_fpfh(points: np.ndarray, normals: np.ndarray, radius: float, max_nn: int) -> np.ndarray:
    """open3d's FPFH written point by point from its published definition, with brute-force neighbour search."""

    def neighbours(i: int) -> list[int]:
        d2 = ((points - points[i]) ** 2).sum(axis=1)
        order = [j for j in np.argsort(d2, kind="stable") if d2[j] < radius * radius]
        return order[:max_nn]

    def pair(p1, n1, p2, n2):
        dp = p2 - p1
        dist = math.sqrt(dp @ dp)
        if dist == 0.0:
            return 0.0, 0.0, 0.0
        a1, a2 = (n1 @ dp) / dist, (n2 @ dp) / dist
        if math.acos(min(1.0, abs(a1))) > math.acos(min(1.0, abs(a2))):
            n1, n2, dp, theta = n2, n1, -dp, -a2
        else:
            theta = a1
        v = np.cross(dp, n1)
        if np.linalg.norm(v) == 0.0:
            return 0.0, 0.0, 0.0
        v = v / np.linalg.norm(v)
        w = np.cross(n1, v)
        return math.atan2(w @ n2, n1 @ n2), v @ n2, theta

    def to_bin(value: float) -> int:
        return min(max(math.floor(value), 0), 10)

    n = len(points)
    hoods = [neighbours(i) for i in range(n)]
    spfh = np.zeros((n, 33))
    for i in range(n):
        if len(hoods[i]) < 2:
            continue
        incr = 100.0 / (len(hoods[i]) - 1)
        for j in hoods[i][1:]:
            alpha, phi, theta = pair(points[i], normals[i], points[j], normals[j])
            spfh[i, to_bin(11 * (alpha + math.pi) / (2 * math.pi))] += incr
            spfh[i, 11 + to_bin(11 * (phi + 1) * 0.5)] += incr
            spfh[i, 22 + to_bin(11 * (theta + 1) * 0.5)] += incr
    out = np.zeros((n, 33))
    for i in range(n):
        if len(hoods[i]) < 2:
            continue
        acc = np.zeros(33)
        for j in hoods[i][1:]:
            d2 = float(((points[i] - points[j]) ** 2).sum())
            if d2 != 0.0:
                acc += spfh[j] / d2
        for b in range(3):
            total = acc[11 * b : 11 * b + 11].sum()
            if total != 0.0:
                acc[11 * b : 11 * b + 11] *= 100.0 / total
        out[i] = acc + spfh[i]
    return out


def _rotation(seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def test_matches_slow_reference_on_small_cloud() -> None:
    points = _bumpy_cloud(220)
    normals = estimate_normals(points, radius=0.1, max_nn=30)
    expected = _reference_fpfh(points, normals, radius=0.03, max_nn=25)  # radius binds for some points, cap for others
    got = fpfh_features(points, normals, radius=0.03, max_nn=25)
    np.testing.assert_allclose(got, expected, atol=1e-9)


def test_each_third_sums_to_200_and_lonely_points_are_zero() -> None:
    points = np.vstack([_bumpy_cloud(300), [[5.0, 5.0, 5.0]]])  # the last point has no neighbour within 0.25
    features = FPFHExtractor(backend="numpy").compute(points)
    thirds = features.reshape(-1, 3, 11).sum(axis=2)
    np.testing.assert_allclose(thirds[:-1], 200.0, atol=1e-9)
    assert np.all(features[-1] == 0.0)
    assert features.min() >= 0.0


def test_plane_gives_the_hand_derived_histogram_and_differs_from_a_sphere() -> None:
    rng = np.random.default_rng(3)
    uv = rng.uniform(-0.04, 0.04, size=(400, 2))
    rotation = _rotation(7)
    plane = np.column_stack([uv, np.zeros(len(uv))]) @ rotation.T + np.array([0.0, 0.0, 0.5])
    extractor = FPFHExtractor(orientation="camera", backend="numpy")
    # On a plane with consistent normals every pair feature is (0, 0, 0): alpha, phi and theta land in bin 5.
    expected = np.zeros(33)
    expected[[5, 16, 27]] = 200.0
    np.testing.assert_allclose(extractor.compute(plane), np.tile(expected, (len(plane), 1)), atol=1e-6)

    directions = rng.normal(size=(400, 3))
    directions[:, 2] = -np.abs(directions[:, 2])  # the half facing the camera
    sphere = 0.04 * directions / np.linalg.norm(directions, axis=1, keepdims=True) + np.array([0.0, 0.0, 0.5])
    sphere_mean = extractor.compute(sphere).mean(axis=0)
    assert np.abs(sphere_mean - expected).sum() > 100.0


def _assert_nearly_equal(got: np.ndarray, expected: np.ndarray) -> None:
    """Equal except for rare knife-edge pairs.

    Points whose neighbourhoods coincide get normals equal to the last bit; for such a pair |angle1| = |angle2|
    and theta's sign (bin 3 or bin 7, say) is decided by rounding, which any transform of the input perturbs. One
    such pair moves its point's row by 100/(n−1) and its neighbours' rows by less, so a few rows differ.
    """
    rows_equal = np.abs(got - expected).max(axis=1) < 1e-6
    assert rows_equal.mean() > 0.75
    assert np.abs(got - expected).mean() < 0.02


def test_invariant_to_rigid_motion() -> None:
    points = _bumpy_cloud(300, seed=1)
    normals = estimate_normals(points, radius=0.1, max_nn=30, orientation="camera")
    rotation, shift = _rotation(11), np.array([0.3, -0.2, 1.0])
    base = fpfh_features(points, normals, radius=0.25, max_nn=40)
    moved = fpfh_features(points @ rotation.T + shift, normals @ rotation.T, radius=0.25, max_nn=40)
    _assert_nearly_equal(moved, base)
    # End to end, camera-facing normals follow any rotation about the camera centre.
    extractor = FPFHExtractor(orientation="camera", backend="numpy", feature_max_nn=40)
    _assert_nearly_equal(extractor.compute(points @ rotation.T), extractor.compute(points))
    # A non-rigid change (stretching one axis) is not invariant: the guard above can fail.
    stretched = fpfh_features(points * np.array([1.0, 3.0, 1.0]), normals, radius=0.25, max_nn=40)
    assert np.abs(stretched - base).mean() > 0.1


def test_radius_scale_makes_units_irrelevant() -> None:
    points = _bumpy_cloud(250, seed=2)
    metres = FPFHExtractor(backend="numpy", feature_radius=0.02, feature_max_nn=30).compute(points)
    millimetres = FPFHExtractor(backend="numpy", feature_radius=0.02, feature_max_nn=30, radius_scale=1000.0)
    _assert_nearly_equal(millimetres.compute(points * 1000.0), metres)
    assert millimetres.config()["radius_scale"] == 1000.0


def test_normals_match_hand_cases_and_orientation() -> None:
    # Diagonal covariance: open3d returns the axis of the smallest variance, with a positive sign.
    cov = np.diag([3.0, 1.0, 2.0])[None]
    np.testing.assert_array_equal(smallest_eigenvectors(cov), [[0.0, 1.0, 0.0]])
    # Too few neighbours: identity covariance, open3d's fallback is +z.
    np.testing.assert_array_equal(smallest_eigenvectors(np.eye(3)[None]), [[0.0, 0.0, 1.0]])
    # General covariances: a unit eigenvector of the smallest eigenvalue.
    rng = np.random.default_rng(5)
    mats = rng.normal(size=(50, 3, 3))
    covs = mats @ mats.transpose(0, 2, 1)
    got = smallest_eigenvectors(covs)
    _, vecs = np.linalg.eigh(covs)
    np.testing.assert_allclose(np.abs(np.einsum("ni,ni->n", got, vecs[:, :, 0])), 1.0, atol=1e-8)
    points = _bumpy_cloud(200)
    facing = estimate_normals(points, radius=0.1, max_nn=30, orientation="camera")
    assert np.all(np.einsum("ni,ni->n", facing, -points) > 0)


def test_extract_projects_onto_the_grid_and_is_deterministic() -> None:
    size = 24
    v, u = np.mgrid[0:size, 0:size] / size * 0.05
    xyz = np.stack([u, v, 0.5 + 2.0 * (u - 0.025) ** 2], axis=-1).astype(np.float32)
    valid = np.zeros((size, size), dtype=bool)
    valid[3:20, 5:22] = True
    extractor = FPFHExtractor(backend="numpy")
    assert isinstance(extractor, PointFeatureExtractor)
    first, second = extractor.extract(xyz, valid), extractor.extract(xyz, valid)
    assert first.features.shape == (int(valid.sum()), 33) and first.features.dtype == torch.float32
    assert torch.equal(first.features, second.features)
    dense = first.dense()
    assert torch.equal(dense[:, ~torch.from_numpy(valid)], torch.zeros(33, int((~valid).sum())))
    expected = extractor.compute(xyz[valid].astype(np.float64)).astype(np.float32)
    assert torch.equal(dense[:, 10, 10], torch.from_numpy(expected[(10 - 3) * 17 + (10 - 5)]))
    assert first.to_grid(8).shape == (33, 8, 8)


def test_config_lists_every_parameter() -> None:
    config = FPFHExtractor(backend="numpy").config()
    assert config == {
        "name": "fpfh",
        "normal_radius": 0.1,
        "normal_max_nn": 30,
        "feature_radius": 0.25,
        "feature_max_nn": 100,
        "radius_scale": 1.0,
        "orientation": "open3d",
        "nonzero": "all",
    }


def test_bad_input_is_rejected() -> None:
    extractor = FPFHExtractor(backend="numpy")
    with pytest.raises(ValueError, match="S×S×3"):
        extractor.extract(np.zeros((4, 5, 3)), np.ones((4, 5), dtype=bool))
    with pytest.raises(ValueError, match="bool"):
        extractor.extract(np.zeros((4, 4, 3)), np.ones((4, 4)))
    with pytest.raises(ValueError, match="NaN"):
        extractor.compute(np.array([[0.0, 0.0, np.nan]]))
    with pytest.raises(ValueError, match="orientation"):
        FPFHExtractor(orientation="up")
    with pytest.raises(ValueError, match="radius_scale"):
        FPFHExtractor(radius_scale=0.0)


@pytest.mark.skipif(not open3d_available(), reason="open3d is not installed")
def test_matches_open3d() -> None:
    import open3d as o3d

    points = _bumpy_cloud(1500, seed=4)
    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points))
    cloud.estimate_normals(o3d.geometry.KDTreeSearchParamHybrid(radius=0.1, max_nn=30))
    # Normals, sign included: open3d leaves them unoriented and we reproduce its closed-form eigenvector.
    np.testing.assert_allclose(estimate_normals(points, 0.1, 30), np.asarray(cloud.normals), atol=1e-7)
    param = o3d.geometry.KDTreeSearchParamHybrid(radius=0.25, max_nn=30)
    theirs = np.asarray(o3d.pipelines.registration.compute_fpfh_feature(cloud, param).data).T
    ours = FPFHExtractor(backend="numpy", feature_max_nn=30).compute(points)
    # Where two nearly parallel normals make |angle1| and |angle2| equal to the last bit, open3d's compiled
    # arithmetic and numpy's can settle theta's sign differently; such pairs are rare and move a few rows slightly.
    close = np.abs(ours - theirs).max(axis=1) < 1e-6
    assert close.mean() > 0.95
    assert np.abs(ours - theirs).mean() < 0.05
