"""Plane fitting and background-plane removal."""

from __future__ import annotations

import numpy as np
import pytest

from mmiad.data.preprocess.plane import border_points, fit_plane_ransac, plane_distances, remove_background_plane

NORMAL = np.array([0.1, -0.2, 1.0]) / np.linalg.norm([0.1, -0.2, 1.0])
OFFSET = -NORMAL @ np.array([0.0, 0.0, 0.5])  # the plane passes through (0, 0, 0.5)


def _plane_points(count: int, noise: float, rng: np.random.Generator) -> np.ndarray:
    """Points on the known plane, spread over ±5 cm, with Gaussian noise along the normal."""
    u = np.cross(NORMAL, [1.0, 0.0, 0.0])
    u /= np.linalg.norm(u)
    v = np.cross(NORMAL, u)
    coords = rng.uniform(-0.05, 0.05, (count, 2))
    base = np.array([0.0, 0.0, 0.5]) + coords[:, :1] * u + coords[:, 1:] * v
    return base + rng.normal(0.0, noise, (count, 1)) * NORMAL


@pytest.mark.parametrize(
    ("outlier_count", "ransac_n"),
    [
        (150, 50),  # the official setting: 5 % clutter leaves ~8 % of 50-point draws clean
        (1000, 3),  # classic 3-point RANSAC survives 25 % clutter
    ],
)
def test_fit_recovers_tilted_plane_under_noise_and_outliers(outlier_count: int, ransac_n: int) -> None:
    rng = np.random.default_rng(1)
    inliers = _plane_points(3000, 0.0005, rng)
    outliers = rng.uniform([-0.05, -0.05, 0.4], [0.05, 0.05, 0.47], (outlier_count, 3))  # >= 15 mm above
    plane = fit_plane_ransac(np.concatenate([inliers, outliers]), ransac_n=ransac_n, seed=3)
    assert np.linalg.norm(plane[:3]) == pytest.approx(1.0, abs=1e-12)
    # Canonical sign: the largest normal component (z here) is positive, like NORMAL.
    np.testing.assert_allclose(plane[:3], NORMAL, atol=1e-3)
    assert plane[3] == pytest.approx(OFFSET, abs=1e-3)


def test_fit_is_deterministic_by_seed() -> None:
    rng = np.random.default_rng(2)
    points = np.concatenate([_plane_points(500, 0.002, rng), rng.uniform(0.3, 0.5, (300, 3))])
    first = fit_plane_ransac(points, seed=7, num_iterations=200)
    again = fit_plane_ransac(points.copy(), seed=7, num_iterations=200)
    np.testing.assert_array_equal(first, again)


def test_fit_with_fewer_points_than_ransac_n_uses_all_of_them() -> None:
    points = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    np.testing.assert_allclose(fit_plane_ransac(points, ransac_n=50), [0.0, 0.0, 1.0, -1.0], atol=1e-12)


@pytest.mark.parametrize(
    ("points", "message"),
    [(np.zeros((2, 3)), "at least 3 points"), (np.zeros((5, 2)), "shape"), (np.full((5, 3), np.nan), "NaN")],
)
def test_fit_rejects_bad_input(points: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fit_plane_ransac(points)


def test_border_points_takes_the_four_strips_of_valid_points() -> None:
    xyz = np.arange(8 * 9 * 3, dtype=np.float32).reshape(8, 9, 3) + 1
    valid = np.ones((8, 9), dtype=bool)
    valid[0, 0] = False
    points = border_points(xyz, valid, border=2)
    # 2 rows top + 2 bottom (9 wide) + 2 cols left + 2 right (8 tall), minus the invalid corner counted twice.
    assert points.shape == (2 * 9 + 2 * 9 + 2 * 8 + 2 * 8 - 2, 3)
    assert not any((p == xyz[0, 0]).all() for p in points)


def _scene() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 60×80 scan of a tilted support plane (1 mm pixels) with a box 2 cm above it in the middle."""
    rows, cols = np.mgrid[0:60, 0:80].astype(np.float64)
    x, y = (cols - 40) * 0.001, (rows - 30) * 0.001
    z = 0.5 + 0.1 * x + 0.05 * y
    obj = (rows >= 20) & (rows < 40) & (cols >= 25) & (cols < 55)
    z = np.where(obj, z - 0.02, z)
    xyz = np.stack([x, y, z], axis=-1).astype(np.float32)
    valid = np.ones((60, 80), dtype=bool)
    valid[3, 3] = False  # an invalid pixel in the border stays invalid and zero
    xyz[3, 3] = 0.0
    return xyz, valid, obj


def test_remove_background_plane_keeps_only_the_object() -> None:
    xyz, valid, obj = _scene()
    before = xyz.copy()
    cleaned, kept = remove_background_plane(xyz, valid)
    np.testing.assert_array_equal(kept, obj)
    np.testing.assert_array_equal(cleaned[obj], xyz[obj])
    assert (cleaned[~obj] == 0).all()
    np.testing.assert_array_equal(xyz, before)  # input untouched


def test_removal_threshold_is_strict_at_five_millimetres() -> None:
    xyz, valid, _ = _scene()
    plane = fit_plane_ransac(border_points(xyz, valid))
    normal = plane[:3]
    # Two points on the line of sight of pixel (30, 10): 4.5 mm and 5.5 mm off the plane.
    near, far = xyz[30, 10] - 0.0045 * normal, xyz[30, 10] - 0.0055 * normal
    xyz[30, 10], xyz[31, 10] = near, far
    assert plane_distances(xyz[30, 10], plane) == pytest.approx(0.0045, abs=1e-6)
    _, kept = remove_background_plane(xyz, valid)
    assert not kept[30, 10]
    assert kept[31, 10]


def test_remove_background_plane_needs_border_points() -> None:
    xyz, valid, _ = _scene()
    valid[:] = False
    valid[25:35, 30:50] = True
    with pytest.raises(ValueError, match="border"):
        remove_background_plane(xyz, valid)
