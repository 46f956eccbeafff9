"""GLFM's Stage-I anomaly synthesis: a stretched bump or dent on a nominal cloud (``generateAD.stretching``).

A region of 1-2 % of the points is pushed along one normal so that the training cloud gets a cone-shaped spike
(or dent) whose points are labelled anomalous. The official rule, step by step (fact sheet §2.1):

1. unoriented normals by PCA of each point's 15 nearest neighbours (Open3D ``estimate_normals``, max_nn 15);
2. region size ``k`` uniform in ``[⌊N/100⌋, ⌊N/50⌋]``, seed point uniform, direction +1 when ``randint(-100, 100)
   >= 0`` (probability 101/201), else -1;
3. ``d̄``: the mean *squared* nearest-neighbour distance over the cloud (Open3D returns squared distances);
4. a copy of the cloud scaled per axis about the origin by ``randint(80, 120) / 100`` each; the region is the
   ``k`` points of that copy nearest to the *unscaled* seed, ranked by distance;
5. the point of rank ``i`` moves by ``n_seed · (k − i) · d̄ · 100 · direction``.

Units: ``d̄ · 100`` is a length only in metres (MVTec 3D-AD). For coordinates in another unit, ``unit_m`` metres
per unit, the same physical displacement is ``(k − i) · d̄ · 100 · unit_m`` in the cloud's units (``d̄`` scales
with the square of the unit, the displacement with the unit): 1 for MVTec 3D-AD and mmiad's synthetic data
(metres), 10 for Eyecandies as mmiad reads it (metres × 0.1, the CFM/M3DM convention).

The official code reseeds Python's ``random`` from the clock for every cloud; here every draw comes from a NumPy
generator the caller seeds, so a run is reproducible. The draws are integers in the official ranges, in the
official order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

NORMAL_NEIGHBOURS = 15
SCALE_RANGE = (80, 120)  # per-axis weights, in hundredths, inclusive
AMPLITUDE = 100.0


@dataclass(frozen=True)
class Stretch:
    """The random choices of one synthesis (for tests and logs).

    Attributes:
        k: Number of moved points.
        seed: Row of the seed point.
        direction: +1 (bump) or -1 (dent).
        axis_scale: The per-axis weights of the scaled copy.
        spacing: d̄, the mean squared nearest-neighbour distance.
    """

    k: int
    seed: int
    direction: int
    axis_scale: tuple[float, float, float]
    spacing: float


def pca_normals(points: np.ndarray, neighbours: int = NORMAL_NEIGHBOURS) -> np.ndarray:
    """(N,3) unit normals: the least-variance axis of each point's ``neighbours`` nearest points (itself included).

    The sign is arbitrary, as Open3D's without orientation; the synthesis draws its direction independently.
    """
    count = min(neighbours, points.shape[0])
    _, index = cKDTree(points).query(points, k=count)
    index = np.asarray(index).reshape(points.shape[0], count)
    local = points[index]  # (N,k,3)
    centred = local - local.mean(axis=1, keepdims=True)
    covariance = np.einsum("nki,nkj->nij", centred, centred) / count
    _, vectors = np.linalg.eigh(covariance)  # ascending eigenvalues
    return vectors[:, :, 0]


def mean_squared_spacing(points: np.ndarray) -> float:
    """d̄: the mean over the points of the squared distance to their nearest other point."""
    if points.shape[0] < 2:
        return 0.0
    distance, _ = cKDTree(points).query(points, k=2)
    return float(np.mean(np.asarray(distance)[:, 1] ** 2))


def draw_stretch(count: int, spacing: float, rng: np.random.Generator) -> Stretch:
    """The random choices for a cloud of ``count`` points, in the official order and ranges."""
    k = int(rng.integers(count // 100, count // 50, endpoint=True))
    seed = int(rng.integers(0, count - 1, endpoint=True))
    direction = 1 if int(rng.integers(-100, 100, endpoint=True)) >= 0 else -1
    low, high = SCALE_RANGE
    scale = tuple(float(rng.integers(low, high, endpoint=True)) / 100.0 for _ in range(3))
    return Stretch(k, seed, direction, (scale[0], scale[1], scale[2]), spacing)


def apply_stretch(
    points: np.ndarray, normals: np.ndarray, stretch: Stretch, unit_m: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """The stretched copy of ``points`` and its (N,) float32 mask of moved points (see the module docstring)."""
    moved = np.array(points, dtype=np.float64, copy=True)
    mask = np.zeros(points.shape[0], dtype=np.float32)
    if stretch.k <= 0:
        return moved.astype(np.float32), mask
    scaled = moved * np.asarray(stretch.axis_scale)
    _, order = cKDTree(scaled).query(moved[stretch.seed], k=stretch.k)
    order = np.atleast_1d(np.asarray(order))
    ranks = np.arange(stretch.k, dtype=np.float64)
    amount = (stretch.k - ranks) * stretch.spacing * AMPLITUDE * unit_m * stretch.direction
    moved[order] += amount[:, None] * normals[stretch.seed][None, :]
    mask[order] = 1.0
    return moved.astype(np.float32), mask


def stretch_anomaly(
    points: np.ndarray, rng: np.random.Generator, unit_m: float = 1.0
) -> tuple[np.ndarray, np.ndarray, Stretch]:
    """One synthetic anomaly on an (N,3) cloud: (points, mask, the choices made)."""
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 3 or points.shape[0] < 2:
        raise ValueError(f"need an (N,3) cloud of at least 2 points, got shape {points.shape}")
    stretch = draw_stretch(points.shape[0], mean_squared_spacing(points), rng)
    normals = pca_normals(points)
    moved, mask = apply_stretch(points, normals, stretch, unit_m)
    return moved, mask, stretch
