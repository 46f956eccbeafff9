"""GLFM's stretch synthesis against a loop-by-loop reference of ``generateAD.stretching`` (fact sheet §2.1)."""

from __future__ import annotations

import numpy as np

from mmiad.methods.glfm.synthesis import draw_stretch, stretch_anomaly


def _cloud(seed: int = 0, count: int = 700) -> np.ndarray:
    """A wavy surface patch in metres (about 4 cm across, mm-scale spacing), like a background-removed object."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(-0.02, 0.02, size=(count, 2))
    z = 0.3 + 0.003 * np.sin(120 * xy[:, 0]) + 0.002 * np.cos(90 * xy[:, 1])
    return np.column_stack([xy, z]).astype(np.float32)  # the official clouds are float32, and so is the output


def _reference(points: np.ndarray, seed: int, unit_m: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Loops over points as the official code does, in float64, with the same draws in the same order.

    Returns (moved points, mask, the seed's normal from a brute-force 15-NN PCA).
    """
    rng = np.random.default_rng(seed)
    count = len(points)
    k = int(rng.integers(count // 100, count // 50, endpoint=True))
    s = int(rng.integers(0, count - 1, endpoint=True))
    direction = 1 if int(rng.integers(-100, 100, endpoint=True)) >= 0 else -1
    weights = [int(rng.integers(80, 120, endpoint=True)) / 100 for _ in range(3)]
    squared = []
    for i in range(count):  # mean squared distance to the nearest other point
        best = np.inf
        for j in range(count):
            if i != j:
                best = min(best, float(np.sum((points[i] - points[j]) ** 2)))
        squared.append(best)
    spacing = float(np.mean(squared))
    order15 = np.argsort([np.sum((points[s] - p) ** 2) for p in points], kind="stable")[:15]
    local = points[order15] - points[order15].mean(axis=0)
    normal = np.linalg.eigh(local.T @ local)[1][:, 0]
    scaled = points * np.array(weights)
    distances = [float(np.sum((scaled[i] - points[s]) ** 2)) for i in range(count)]
    ranked = np.argsort(distances, kind="stable")[:k]
    moved, mask = points.copy(), np.zeros(count)
    for i, index in enumerate(ranked):
        moved[index] = moved[index] + normal * (k - i) * spacing * 100 * unit_m * direction
        mask[index] = 1
    return moved, mask, normal


def test_stretch_matches_the_loop_reference_up_to_the_normal_sign() -> None:
    points = _cloud().astype(np.float64)
    for seed in range(4):
        moved, mask, stretch = stretch_anomaly(points, np.random.default_rng(seed))
        ref_moved, ref_mask, ref_normal = _reference(points, seed, 1.0)
        np.testing.assert_array_equal(mask, ref_mask)
        assert int(mask.sum()) == stretch.k and len(points) // 100 <= stretch.k <= len(points) // 50
        shift, ref_shift = moved - points, ref_moved - points
        # The normal's sign is arbitrary (unoriented PCA, like Open3D's); sizes and the axis must agree.
        # float32 output: coordinates near 0.3 m carry ~3e-8 m of rounding
        np.testing.assert_allclose(np.linalg.norm(shift, axis=1), np.linalg.norm(ref_shift, axis=1), atol=1e-7)
        moved_rows = np.flatnonzero((mask > 0) & (np.linalg.norm(ref_shift, axis=1) > 1e-5))
        cosines = shift[moved_rows] @ ref_normal / np.linalg.norm(shift[moved_rows], axis=1)
        np.testing.assert_allclose(np.abs(cosines), 1.0, atol=1e-5)
        assert np.all(np.abs(shift[mask == 0]) < 1e-7)


def test_displacement_falls_linearly_with_rank_and_is_reproducible() -> None:
    points = _cloud(1)
    first = stretch_anomaly(points, np.random.default_rng(7))
    again = stretch_anomaly(points, np.random.default_rng(7))
    np.testing.assert_array_equal(first[0], again[0])
    moved, mask, stretch = first
    sizes = np.sort(np.linalg.norm(moved - points, axis=1)[mask == 1])[::-1]
    expected = (stretch.k - np.arange(stretch.k)) * stretch.spacing * 100
    np.testing.assert_allclose(sizes, expected, atol=1e-7)


def test_units_scale_the_displacement_with_the_cloud() -> None:
    """The same physical bump in metres and in Eyecandies' units (metres × 0.1, unit_m = 10)."""
    metres = _cloud(2)
    in_metres = stretch_anomaly(metres, np.random.default_rng(3), unit_m=1.0)[0]
    in_units = stretch_anomaly(metres * 0.1, np.random.default_rng(3), unit_m=10.0)[0]
    np.testing.assert_allclose(in_units, in_metres * 0.1, rtol=1e-5, atol=1e-9)


def test_direction_draw_follows_the_official_rule() -> None:
    """+1 when randint(-100, 100) >= 0: probability 101/201."""
    rng = np.random.default_rng(0)
    ups = sum(draw_stretch(1000, 1.0, rng).direction == 1 for _ in range(4000))
    assert abs(ups / 4000 - 101 / 201) < 0.03
