"""Memory-bounded DBSCAN and largest-cluster cleaning of organized point clouds.

The official preprocessing keeps only the largest ``cluster_dbscan(eps=6 mm, min_points=30)`` cluster, which drops
sensor noise and leftovers of the support plane. On MVTec 3D-AD a scan has 100k–300k points spaced 0.2–0.5 mm
apart, so each point has thousands of neighbours within 6 mm and a neighbour-list DBSCAN (sklearn) needs many GB.

This implementation works on a grid of cells with side ``eps/√3``: any two points of one cell are neighbours.

* Core points: every point of a cell holding at least ``min_points`` points is core without any search; a cell
  whose whole neighbourhood holds fewer than ``min_points`` points has no core point; only the points of the
  remaining cells are counted with a k-d tree (chunked, lengths only, so no neighbour lists are built).
* Clusters: the core points of one cell are all connected, so clusters are connected components of *cells*. Two
  neighbouring cells are linked when some pair of their core points lies within ``eps``; a cheap representative
  test accepts most links at once and exact nearest-neighbour checks settle the rest, skipping pairs whose cells
  are already known to be connected.
* Border points (non-core, within ``eps`` of a core point) join the cluster of their nearest core point.

Core points and noise are exactly those of DBSCAN (sklearn ``DBSCAN(eps, min_samples=min_points)``, whose counts
include the point itself and whose radius test is ``<= eps``). A border point within reach of two clusters is
ambiguous in DBSCAN itself (sklearn assigns it to whichever cluster is expanded first); here it goes to the cluster
of its nearest core point, which is deterministic.
"""

from __future__ import annotations

import itertools

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

NOISE = -1
#: Points counted per k-d tree query chunk when core status cannot be decided from the grid.
_QUERY_CHUNK = 16384
#: Below this many point pairs two cells are compared by brute force rather than with a k-d tree.
_BRUTE_FORCE_PAIRS = 4096


class _UnionFind:
    """Disjoint sets over cell ids with path halving."""

    def __init__(self, parents: np.ndarray) -> None:
        self.parent = parents.tolist()

    def find(self, item: int) -> int:
        parent = self.parent
        while parent[item] != item:
            parent[item] = parent[parent[item]]
            item = parent[item]
        return item

    def union(self, first: int, second: int) -> None:
        root_a, root_b = self.find(first), self.find(second)
        if root_a != root_b:
            self.parent[max(root_a, root_b)] = min(root_a, root_b)


def _cell_keys(points: np.ndarray, side: float, reach: int) -> tuple[np.ndarray, np.ndarray]:
    """Encode each point's grid cell as one int64 (with a ``reach``-cell margin) and return the axis strides."""
    # Check the extent in floating point *before* casting: a cloud spanning 1e19 m casts to garbage int64 cells.
    extent = (points.max(axis=0) - points.min(axis=0)) / side + 2 * reach + 2
    if not np.isfinite(extent).all() or float(np.prod(extent)) >= 2.0**62:
        raise ValueError("eps is too small for the extent of the cloud (the cell grid would overflow int64)")
    cells = np.floor((points - points.min(axis=0)) / side).astype(np.int64) + reach
    dims = cells.max(axis=0) + 1 + reach
    strides = np.array([dims[1] * dims[2], dims[2], 1], dtype=np.int64)
    return cells @ strides, strides


def _neighbour_pairs(cell_keys: np.ndarray, strides: np.ndarray, reach: int, half: bool) -> list[np.ndarray]:
    """For each non-zero grid offset within ``reach``, the (i, j) index pairs of occupied neighbouring cells.

    With ``half`` only one of each pair of opposite offsets is used, so every unordered cell pair appears once.
    """
    pairs = []
    for offset in itertools.product(range(-reach, reach + 1), repeat=3):
        if offset == (0, 0, 0) or (half and offset < (0, 0, 0)):
            continue
        target = cell_keys + int(np.dot(offset, strides))
        position = np.searchsorted(cell_keys, target)
        position[position >= len(cell_keys)] = 0
        found = cell_keys[position] == target
        pairs.append(np.stack([np.flatnonzero(found), position[found]], axis=1))
    return pairs


def _core_mask(points: np.ndarray, eps: float, min_points: int, side: float, reach: int) -> tuple[np.ndarray, ...]:
    """Decide which points are DBSCAN core points; also return the cell of each point and the sorted cell keys."""
    keys, strides = _cell_keys(points, side, reach)
    cell_keys, cell_of_point, cell_counts = np.unique(keys, return_inverse=True, return_counts=True)
    cell_of_point = cell_of_point.ravel()
    upper_bound = cell_counts.copy()
    for pairs in _neighbour_pairs(cell_keys, strides, reach, half=False):
        upper_bound += np.bincount(pairs[:, 0], weights=cell_counts[pairs[:, 1]], minlength=len(cell_keys)).astype(
            np.int64
        )
    dense = cell_counts >= min_points
    undecided = ~dense & (upper_bound >= min_points)
    core = dense[cell_of_point]
    to_count = np.flatnonzero(undecided[cell_of_point])
    if to_count.size:
        tree = cKDTree(points)
        for start in range(0, to_count.size, _QUERY_CHUNK):
            chunk = to_count[start : start + _QUERY_CHUNK]
            lengths = tree.query_ball_point(points[chunk], r=eps, return_length=True)
            core[chunk] = np.asarray(lengths) >= min_points
    return core, cell_of_point, cell_keys, strides


def _cells_touch(first: np.ndarray, second: np.ndarray, eps: float, trees: dict[int, cKDTree], key: int) -> bool:
    """True when some point of ``first`` lies within ``eps`` of some point of ``second`` (cached tree of second)."""
    if first.shape[0] * second.shape[0] <= _BRUTE_FORCE_PAIRS:
        diff = first[:, None, :] - second[None, :, :]
        return bool((np.einsum("ijk,ijk->ij", diff, diff) <= eps * eps).any())
    tree = trees.get(key)
    if tree is None:
        tree = trees[key] = cKDTree(second)
    distances, _ = tree.query(first, k=1, distance_upper_bound=eps * (1 + 1e-9))
    return bool((distances <= eps).any())


def dbscan_labels(points: np.ndarray, *, eps: float = 0.006, min_points: int = 30) -> np.ndarray:
    """DBSCAN cluster labels of an (N, 3) cloud in bounded memory.

    Args:
        points: (N, 3) coordinates.
        eps: Neighbourhood radius (inclusive, as in sklearn).
        min_points: Neighbours, the point itself included, that make a point core.

    Returns:
        (N,) int64 labels: ``-1`` for noise, clusters numbered 0, 1, … in the order of their first point.

    Raises:
        ValueError: for a bad shape, non-finite points or bad parameters.
    """
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise ValueError(f"expected points of shape (N, 3), got {pts.shape}")
    if not np.isfinite(pts).all():
        raise ValueError("points contain NaN or infinite coordinates")
    if eps <= 0 or min_points < 1:
        raise ValueError(f"need eps > 0 and min_points >= 1, got eps={eps}, min_points={min_points}")
    labels = np.full(pts.shape[0], NOISE, dtype=np.int64)
    if pts.shape[0] == 0:
        return labels
    # Slightly under eps/√3 so that rounding can never put two points farther than eps into one cell.
    side = eps / np.sqrt(3.0) * (1.0 - 1e-9)
    reach = int(np.ceil(eps / side))
    core, cell_of_point, cell_keys, strides = _core_mask(pts, eps, min_points, side, reach)
    core_index = np.flatnonzero(core)
    if core_index.size == 0:
        return labels

    # Group core points by cell; core cells are renumbered 0..C-1.
    order = core_index[np.argsort(cell_of_point[core_index], kind="stable")]
    core_cells, starts = np.unique(cell_of_point[order], return_index=True)
    ends = np.append(starts[1:], order.size)
    sizes = ends - starts
    sorted_points = pts[order]
    lows = np.minimum.reduceat(sorted_points, starts, axis=0)
    highs = np.maximum.reduceat(sorted_points, starts, axis=0)
    centroids = np.add.reduceat(sorted_points, starts, axis=0) / sizes[:, None]
    # Representative of a cell: its core point nearest to the cell's core centroid (first one on ties).
    cell_rank = np.repeat(np.arange(starts.size), sizes)
    spread = ((sorted_points - centroids[cell_rank]) ** 2).sum(axis=1)
    representatives = sorted_points[np.lexsort((spread, cell_rank))[starts]]

    candidates = np.concatenate(_neighbour_pairs(cell_keys[core_cells], strides, reach, half=True), axis=0)
    if candidates.size:
        first, second = candidates[:, 0], candidates[:, 1]
        gaps = np.maximum(0.0, np.maximum(lows[second] - highs[first], lows[first] - highs[second]))
        candidates = candidates[(gaps * gaps).sum(axis=1) <= eps * eps]
    first, second = candidates[:, 0], candidates[:, 1]
    quick = ((representatives[first] - representatives[second]) ** 2).sum(axis=1) <= eps * eps
    graph = coo_matrix((np.ones(int(quick.sum())), (first[quick], second[quick])), shape=(starts.size,) * 2)
    _, component = connected_components(graph, directed=False)
    # Seed the union-find with the components found so far: each cell points at the first cell of its component.
    _, first_cell = np.unique(component, return_index=True)
    sets = _UnionFind(first_cell[component])
    trees: dict[int, cKDTree] = {}
    for a, b in candidates[~quick][component[first[~quick]] != component[second[~quick]]].tolist():
        if sets.find(a) == sets.find(b):
            continue
        small, large = (a, b) if sizes[a] <= sizes[b] else (b, a)
        group_small = sorted_points[starts[small] : ends[small]]
        group_large = sorted_points[starts[large] : ends[large]]
        if _cells_touch(group_small, group_large, eps, trees, large):
            sets.union(a, b)
    roots = np.array([sets.find(cell) for cell in range(starts.size)], dtype=np.int64)

    cell_root = np.full(cell_keys.shape[0], -1, dtype=np.int64)
    cell_root[core_cells] = roots
    point_root = np.full(pts.shape[0], -1, dtype=np.int64)
    point_root[core_index] = cell_root[cell_of_point[core_index]]
    border = np.flatnonzero(~core)
    if border.size:
        distances, nearest_core = cKDTree(pts[core_index]).query(pts[border], k=1, distance_upper_bound=eps * 1.000001)
        reached = distances <= eps
        point_root[border[reached]] = point_root[core_index[nearest_core[reached]]]
    clustered = point_root >= 0
    # Number clusters by their first point so the labelling does not depend on the internal cell order.
    roots_in_order, first_point = np.unique(point_root[clustered], return_index=True)
    rank = np.empty(roots_in_order.size, dtype=np.int64)
    rank[np.argsort(first_point, kind="stable")] = np.arange(roots_in_order.size)
    labels[clustered] = rank[np.searchsorted(roots_in_order, point_root[clustered])]
    return labels


def keep_largest_cluster(
    xyz: np.ndarray, valid: np.ndarray, *, eps: float = 0.006, min_points: int = 30
) -> tuple[np.ndarray, np.ndarray]:
    """Keep only the largest DBSCAN cluster of the valid points; zero everything else.

    Deviation from the official code: its noise label −1 can "win" when noise outnumbers every cluster; here noise
    is never kept, so a cloud with no cluster comes back with no valid point. A tie between equally large clusters
    goes to the cluster whose first point comes first in raster order.

    Args:
        xyz: (H, W, 3) organized point cloud.
        valid: (H, W) bool mask of valid points.
        eps: DBSCAN radius.
        min_points: DBSCAN core threshold (the point itself included).

    Returns:
        New ``(xyz, valid)``; the inputs are not modified.
    """
    xyz = np.asarray(xyz)
    valid = np.asarray(valid, dtype=bool)
    if xyz.ndim != 3 or xyz.shape[-1] != 3 or valid.shape != xyz.shape[:2]:
        raise ValueError(f"expected xyz (H, W, 3) and valid (H, W), got {xyz.shape} and {valid.shape}")
    labels = dbscan_labels(xyz[valid], eps=eps, min_points=min_points)
    kept = np.zeros_like(valid)
    if (labels >= 0).any():
        largest = int(np.argmax(np.bincount(labels[labels >= 0])))
        kept[valid] = labels == largest
    cleaned = np.where(kept[..., None], xyz, 0).astype(xyz.dtype, copy=False)
    return cleaned, kept
