"""Background-plane removal: a seeded RANSAC plane fit on the image border, then a distance cut on every point.

MVTec 3D-AD scans an object lying on a flat support. The official preprocessing (CFM, Uni-RCM, M3DM, BTF all share
it) fits that plane with open3d's ``segment_plane`` on the points of the 10-pixel image border, where the support
dominates, and zeroes every point closer than 5 mm to it. This module reproduces that in plain numpy so the library
needs no open3d, and seeds the RANSAC so the cleaned dataset is reproducible.
"""

from __future__ import annotations

import numpy as np

#: Upper bound on the size of the (points × iterations) distance matrix evaluated at once, to keep memory small.
_MAX_BATCH_ELEMENTS = 1 << 21


def _fit_planes(groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares planes through each of a batch of point groups.

    The normal is the eigenvector of the smallest eigenvalue of the group's scatter matrix, which minimises the sum
    of squared orthogonal distances (what open3d does for more than three points).

    Args:
        groups: (B, n, 3) float64.

    Returns:
        normals (B, 3) of unit length and offsets d (B,) with ``normal · p + d = 0`` on the plane.
    """
    centroids = groups.mean(axis=1)
    centred = groups - centroids[:, None, :]
    scatter = np.einsum("bni,bnj->bij", centred, centred)
    _, vectors = np.linalg.eigh(scatter)
    normals = vectors[:, :, 0]
    offsets = -np.einsum("bi,bi->b", normals, centroids)
    return normals, offsets


def _canonical(normal: np.ndarray, offset: float) -> np.ndarray:
    """Flip the plane's sign so that its largest normal component is positive: the same plane gives the same vector."""
    if normal[np.argmax(np.abs(normal))] < 0:
        normal, offset = -normal, -offset
    return np.array([normal[0], normal[1], normal[2], offset], dtype=np.float64)


def fit_plane_ransac(
    points: np.ndarray,
    *,
    distance_threshold: float = 0.004,
    ransac_n: int = 50,
    num_iterations: int = 1000,
    seed: int = 0,
) -> np.ndarray:
    """Fit a plane robustly with RANSAC, following open3d's ``segment_plane``.

    Each iteration draws ``ransac_n`` distinct points, fits a least-squares plane and counts the inliers closer than
    ``distance_threshold``. The best model has the most inliers (ties: the smaller inlier RMSE, then the earlier
    iteration); it is finally refitted on all its inliers. Unlike open3d there is no early stop, so the result
    depends only on the seed. Iterations are evaluated in batches so 1000 iterations on ~10k points stay fast.

    Args:
        points: (N, 3) coordinates.
        distance_threshold: Inlier distance in the points' unit (metres for MVTec 3D-AD).
        ransac_n: Points per hypothesis; clamped to N when fewer points exist.
        num_iterations: Number of hypotheses.
        seed: Seed of the ``np.random.Generator`` that draws the hypotheses.

    Returns:
        ``[a, b, c, d]`` with a unit normal ``(a, b, c)``, sign chosen so its largest component is positive.

    Raises:
        ValueError: for a bad shape, non-finite points, fewer than 3 points or bad parameters.
    """
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise ValueError(f"expected points of shape (N, 3), got {pts.shape}")
    if not np.isfinite(pts).all():
        raise ValueError("points contain NaN or infinite coordinates")
    if ransac_n < 3:
        raise ValueError(f"ransac_n must be at least 3, got {ransac_n}")
    if num_iterations < 1:
        raise ValueError(f"num_iterations must be at least 1, got {num_iterations}")
    if distance_threshold <= 0:
        raise ValueError(f"distance_threshold must be positive, got {distance_threshold}")
    count = pts.shape[0]
    if count < 3:
        raise ValueError(f"a plane needs at least 3 points, got {count}")
    sample_size = min(ransac_n, count)
    rng = np.random.default_rng(seed)
    batch = max(1, min(num_iterations, _MAX_BATCH_ELEMENTS // count))
    points_t = np.ascontiguousarray(pts.T)

    best_count, best_rmse = -1, np.inf
    best_normal, best_offset = np.zeros(3), 0.0
    for start in range(0, num_iterations, batch):
        size = min(batch, num_iterations - start)
        # Distinct indices per hypothesis, as open3d draws them (Generator.choice uses Floyd's method: cheap).
        chosen = np.stack([rng.choice(count, size=sample_size, replace=False) for _ in range(size)])
        normals, offsets = _fit_planes(pts[chosen])
        # (size, N); einsum beats BLAS for an inner dimension of 3. Made absolute in place to save memory traffic.
        distances = np.einsum("bi,in->bn", normals, points_t)
        distances += offsets[:, None]
        np.abs(distances, out=distances)
        inliers = distances < distance_threshold
        counts = np.count_nonzero(inliers, axis=1)
        # The RMSE only breaks ties, so it is computed for the hypotheses with the batch's top count only.
        tied = np.flatnonzero(counts == counts.max())
        rmses = np.sqrt(np.where(inliers[tied], distances[tied] ** 2, 0.0).sum(axis=1) / np.maximum(counts[tied], 1))
        top = int(tied[np.argmin(rmses)])  # argmin keeps the earliest iteration on exact ties
        top_rmse = float(rmses.min())
        if counts[top] > best_count or (counts[top] == best_count and top_rmse < best_rmse):
            best_count, best_rmse = int(counts[top]), top_rmse
            best_normal, best_offset = normals[top], float(offsets[top])

    inlier_mask = np.abs(pts @ best_normal + best_offset) < distance_threshold
    if inlier_mask.sum() >= 3:
        normals, offsets = _fit_planes(pts[inlier_mask][None])
        best_normal, best_offset = normals[0], float(offsets[0])
    return _canonical(best_normal, best_offset)


def border_points(xyz: np.ndarray, valid: np.ndarray, border: int = 10) -> np.ndarray:
    """The valid points of the top, bottom, left and right ``border``-pixel strips, as (M, 3).

    The four strips are concatenated as the official code does, so the corner pixels appear twice; this only
    slightly reweights the corners in the RANSAC draw and keeps the fit comparable with the official one.
    """
    if border < 1:
        raise ValueError(f"border must be at least 1 pixel, got {border}")
    strips = [
        (xyz[:border], valid[:border]),
        (xyz[-border:], valid[-border:]),
        (xyz[:, :border], valid[:, :border]),
        (xyz[:, -border:], valid[:, -border:]),
    ]
    return np.concatenate([points[mask] for points, mask in strips], axis=0).astype(np.float64)


def plane_distances(xyz: np.ndarray, plane: np.ndarray) -> np.ndarray:
    """Unsigned distance of every point of an (…, 3) array to a plane ``[a, b, c, d]`` with unit normal."""
    plane = np.asarray(plane, dtype=np.float64)
    return np.abs(np.asarray(xyz, dtype=np.float64) @ plane[:3] + plane[3])


def remove_background_plane(
    xyz: np.ndarray,
    valid: np.ndarray,
    *,
    border: int = 10,
    distance_threshold: float = 0.004,
    removal_threshold: float = 0.005,
    ransac_n: int = 50,
    num_iterations: int = 1000,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Zero every point within ``removal_threshold`` of the support plane fitted on the image border.

    The RANSAC inlier threshold (4 mm) and the removal threshold (5 mm) differ in the official code; both are kept.

    Args:
        xyz: (H, W, 3) organized point cloud.
        valid: (H, W) bool mask of valid points.
        border: Width in pixels of the border strips used for the fit.
        distance_threshold: RANSAC inlier threshold.
        removal_threshold: Points strictly closer than this to the plane are removed.
        ransac_n: Points per RANSAC hypothesis.
        num_iterations: RANSAC hypotheses.
        seed: RANSAC seed.

    Returns:
        New ``(xyz, valid)``; removed points are exactly zero. The inputs are not modified.

    Raises:
        ValueError: when the shapes disagree or the border has fewer than 3 valid points.
    """
    xyz = np.asarray(xyz)
    valid = np.asarray(valid, dtype=bool)
    if xyz.ndim != 3 or xyz.shape[-1] != 3 or valid.shape != xyz.shape[:2]:
        raise ValueError(f"expected xyz (H, W, 3) and valid (H, W), got {xyz.shape} and {valid.shape}")
    edge = border_points(xyz, valid, border)
    if edge.shape[0] < 3:
        raise ValueError(f"only {edge.shape[0]} valid points in the {border}-pixel border; cannot fit the background")
    plane = fit_plane_ransac(
        edge, distance_threshold=distance_threshold, ransac_n=ransac_n, num_iterations=num_iterations, seed=seed
    )
    on_plane = valid & (plane_distances(xyz, plane) < removal_threshold)
    kept = valid & ~on_plane
    cleaned = np.where(kept[..., None], xyz, 0).astype(xyz.dtype, copy=False)
    return cleaned, kept
