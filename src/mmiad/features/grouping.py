"""Point grouping for Point-MAE: farthest point sampling, kNN neighbourhoods, and 3-NN interpolation back.

All of it is deterministic. FPS starts at index 0, like the CUDA ``furthest_point_sample`` kernel the official
code uses (the repos' pure-torch version starts at a random index). Among equally far points the *last* index
wins, which is what the optional compiled ``fpsample`` package does; the NumPy fallback reproduces it exactly, so
features do not depend on whether the package is installed. kNN ties are broken by the lower point index.

``fpsample`` serves as an independent cross-check; the fallback is the default because it is faster. Nothing
loops over points in Python: FPS loops over the samples (vectorised over points), kNN and interpolation work on
chunks of centres/points so a 50k-point cloud never needs a 50k×1024 distance matrix at once.

Everything also runs on any torch device: :func:`farthest_point_sample_torch` performs the NumPy path's float32
operations in the same order (separate multiplies and adds, no fused multiply-add) with the same reversed-order
tie rule, so it returns the same indices; the brute-force kNN is plain tensor code. Clouds on an accelerator are
grouped there without a round trip to the host (the k-d tree is a CPU structure and is used on CPU tensors only).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from mmiad.utils.threads import single_thread_on_cpu

try:  # optional compiled FPS; results are identical to the fallback
    import fpsample as _fpsample
except ImportError:  # pragma: no cover - depends on the environment
    _fpsample = None

#: Whether the optional ``fpsample`` package is available.
HAS_FPSAMPLE = _fpsample is not None

#: A replacement grouping: ``(points (N,3), num_group, group_size) -> (centre_idx (G,), member_idx (G,K))``.
GroupingFn = Callable[[torch.Tensor, int, int], tuple[torch.Tensor, torch.Tensor]]

_CHUNK_ELEMENTS = 1 << 22  # distance-matrix entries per chunk (16 MB of float32)


def _check_points(points: np.ndarray | torch.Tensor) -> None:
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"expected points of shape (N,3), got {tuple(points.shape)}")


def farthest_point_sample(points: np.ndarray, count: int, *, backend: str = "auto") -> np.ndarray:
    """Indices of ``count`` points chosen by farthest point sampling, starting at index 0.

    Args:
        points: (N,3) coordinates; computed in float32 like the official kernel.
        count: Samples to take; must be in [1, N].
        backend: ``"numpy"``, ``"fpsample"`` (the optional compiled package), ``"torch"`` (CPU tensors; see
            :func:`farthest_point_sample_torch` for other devices) or ``"auto"``. All give identical indices.
            ``"auto"`` uses NumPy: measured on 2 cores it is about 3× faster than fpsample 1.0.2's vanilla FPS
            (0.08 s against 0.23 s for 1024 of 50k points), whose loop is scalar.

    Returns:
        (count,) int64 indices; the first is 0.
    """
    _check_points(points)
    total = int(points.shape[0])
    if not 1 <= count <= total:
        raise ValueError(f"cannot sample {count} points from a cloud of {total}")
    if backend not in ("auto", "fpsample", "numpy", "torch"):
        raise ValueError(f"unknown FPS backend {backend!r}")
    if backend == "fpsample" and _fpsample is None:
        raise ValueError("FPS backend 'fpsample' requested but the package is not installed (pip install fpsample)")
    points = np.asarray(points, dtype=np.float32)
    if backend == "torch":
        return farthest_point_sample_torch(torch.from_numpy(points), count).numpy()
    if backend == "fpsample":
        return np.asarray(_fpsample.fps_sampling(points, count, start_idx=0), dtype=np.int64)
    return _fps_numpy(points, count)


def _fps_numpy(points: np.ndarray, count: int) -> np.ndarray:
    """Vectorised FPS; coordinates are reversed so argmax's first-of-ties rule picks the last original index."""
    total = points.shape[0]
    x, y, z = (np.ascontiguousarray(points[::-1, axis]) for axis in range(3))
    nearest = np.full(total, np.inf, dtype=np.float32)
    chosen = np.empty(count, dtype=np.int64)
    last = total - 1  # reversed position of original index 0
    chosen[0] = 0
    for step in range(1, count):
        dx, dy, dz = x - x[last], y - y[last], z - z[last]
        dist = dx * dx
        dist += dy * dy
        dist += dz * dz
        np.minimum(nearest, dist, out=nearest)
        last = int(np.argmax(nearest))
        chosen[step] = total - 1 - last
    return chosen


def farthest_point_sample_torch(points: torch.Tensor, count: int) -> torch.Tensor:
    """Farthest point sampling on the points' own device, giving the same indices as the NumPy path.

    The loop keeps the current index as a device tensor, so an accelerator never waits for the host between
    samples. Distances use the NumPy path's float32 arithmetic in its order (``dx·dx``, then ``+ dy·dy``, then
    ``+ dz·dz``, each a separate rounding), and the coordinates are reversed so that argmax's first-of-ties rule
    picks the last original index, as the NumPy path and ``fpsample`` do.

    Args:
        points: (N,3) coordinates on any device; computed in float32.
        count: Samples to take; must be in [1, N].

    Returns:
        (count,) int64 indices on the points' device; the first is 0.
    """
    _check_points(points)
    total = int(points.shape[0])
    if not 1 <= count <= total:
        raise ValueError(f"cannot sample {count} points from a cloud of {total}")
    coords = points.float().flip(0).T.contiguous()  # (3, N), reversed order
    nearest = torch.full((total,), float("inf"), device=points.device)
    dist = torch.empty(total, device=points.device)
    term = torch.empty(total, device=points.device)
    chosen = torch.empty(count, dtype=torch.long, device=points.device)
    last = torch.full((1,), total - 1, dtype=torch.long, device=points.device)  # reversed position of index 0
    chosen[0] = 0
    with single_thread_on_cpu(points.device):  # thousands of small memory-bound ops (see mmiad.utils.threads)
        for step in range(1, count):
            centre = coords.index_select(1, last)  # (3, 1)
            torch.sub(coords[0], centre[0], out=dist)
            dist.mul_(dist)
            for axis in (1, 2):
                torch.sub(coords[axis], centre[axis], out=term)
                term.mul_(term)
                dist.add_(term)
            torch.minimum(nearest, dist, out=nearest)
            last = torch.argmax(nearest).view(1)
            chosen[step : step + 1] = total - 1 - last
    return chosen


def _smallest_k(dist: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, the indices of the k smallest values, ascending by (value, index), independent of topk's ties.

    topk alone may pick any of several points tied at the k-th distance; rows with such a tie (rare on real
    data) are redone exactly, preferring lower indices, so the result never depends on the topk implementation.
    """
    extra = min(k + 1, dist.shape[1])  # one more than needed: a tie at the boundary shows as equal k-th, k+1-th
    values, columns = torch.topk(dist, extra, dim=1, largest=False, sorted=True)
    threshold = values[:, k - 1 : k]
    tied_rows = torch.nonzero(values[:, extra - 1] == threshold[:, 0])[:, 0] if extra > k else values[:0, 0].long()
    columns = columns[:, :k]
    if tied_rows.numel():
        sub = dist[tied_rows]
        below = sub < threshold[tied_rows]
        at = sub == threshold[tied_rows]
        slots = k - below.sum(dim=1, keepdim=True)
        take = below | (at & (torch.cumsum(at, dim=1) <= slots))
        columns = columns.clone()
        columns[tied_rows] = torch.nonzero(take)[:, 1].view(-1, k)
    columns = torch.sort(columns, dim=1).values
    order = torch.argsort(torch.gather(dist, 1, columns), dim=1, stable=True)
    return torch.gather(columns, 1, order)


def _squared_distances(queries: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
    """Exact squared distances by explicit differences (no |a|²+|b|²−2ab cancellation for near-duplicates).

    Accumulated one coordinate at a time, in place, which is several times faster than reducing a (Q,N,3) array.
    """
    queries_t, refs_t = queries.T.contiguous(), refs.T.contiguous()
    dist = queries_t[0, :, None] - refs_t[0, None, :]
    dist.mul_(dist)
    for axis in (1, 2):
        diff = queries_t[axis, :, None] - refs_t[axis, None, :]
        dist.addcmul_(diff, diff)
    return dist


def _knn_brute(points: torch.Tensor, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact kNN by chunked distance matrices: the reference the k-d tree path must reproduce."""
    chunk = max(1, _CHUNK_ELEMENTS // max(1, points.shape[0]))
    indices, distances = [], []
    for start in range(0, queries.shape[0], chunk):
        dist = _squared_distances(queries[start : start + chunk], points)
        idx = _smallest_k(dist, k)
        indices.append(idx)
        distances.append(torch.gather(dist, 1, idx))
    if not indices:
        return (
            torch.empty(0, k, dtype=torch.long, device=points.device),
            torch.empty(0, k, dtype=points.dtype, device=points.device),
        )
    return torch.cat(indices), torch.cat(distances)


def _candidate_distances(points: torch.Tensor, queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Squared distances to candidate points with the same float32 arithmetic as :func:`_squared_distances`."""
    gathered = points[candidates]
    dist = queries[:, None, 0] - gathered[..., 0]
    dist.mul_(dist)
    for axis in (1, 2):
        diff = queries[:, None, axis] - gathered[..., axis]
        dist.addcmul_(diff, diff)
    return dist


def _knn_kdtree(points: torch.Tensor, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """kNN through a k-d tree, returning exactly what :func:`_knn_brute` returns.

    The tree proposes k+1 candidates per query; their distances are recomputed in float32 as the brute force does
    and ordered by (distance, index). A row whose k-th and (k+1)-th candidates are tied, or so close that float32
    rounding could reorder them against a point outside the candidates, is redone by brute force.
    """
    from scipy.spatial import cKDTree

    extra = min(k + 1, points.shape[0])
    tree = cKDTree(points.double().numpy())
    tree_dist, found = tree.query(queries.double().numpy(), k=extra)
    found = torch.from_numpy(np.asarray(found).reshape(len(queries), extra)).long()
    tree_dist = torch.from_numpy(np.asarray(tree_dist).reshape(len(queries), extra))
    found = torch.sort(found, dim=1).values
    dist = _candidate_distances(points, queries, found)
    order = torch.argsort(dist, dim=1, stable=True)
    found, dist = torch.gather(found, 1, order), torch.gather(dist, 1, order)
    indices, distances = found[:, :k].contiguous(), dist[:, :k].contiguous()
    if extra > k:
        kth, next_ = tree_dist[:, k - 1] ** 2, tree_dist[:, k] ** 2
        unsafe = (dist[:, k - 1] >= dist[:, k]) | (next_ <= kth * (1 + 1e-5) + 1e-20)
        rows = torch.nonzero(unsafe)[:, 0]
        if rows.numel():
            exact_idx, exact_dist = _knn_brute(points, queries[rows], k)
            indices[rows], distances[rows] = exact_idx, exact_dist
    return indices, distances


def knn_indices(
    points: torch.Tensor, queries: torch.Tensor, k: int, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """For every query, its k nearest points: (Q,k) indices and (Q,k) squared distances, nearest first.

    Args:
        points: (N,3) reference points.
        queries: (Q,3) query points.
        k: Neighbours per query, 1 ≤ k ≤ N.
        backend: ``brute`` (chunked distance matrices), ``kdtree`` (scipy; same results, much faster on large
            clouds) or ``auto`` (k-d tree when the brute force would compute more than a few million distances,
            for CPU tensors; brute force on an accelerator, where it is fast and the tree would need a copy to
            the host). Results are on the points' device.
    """
    _check_points(points)
    _check_points(queries)
    if not 1 <= k <= points.shape[0]:
        raise ValueError(f"k={k} must be in [1, {points.shape[0]}]")
    if backend not in ("auto", "brute", "kdtree"):
        raise ValueError(f"unknown kNN backend {backend!r}; expected auto, brute or kdtree")
    large = points.shape[0] * queries.shape[0] > _CHUNK_ELEMENTS
    on_cpu = points.device.type == "cpu"
    if backend == "kdtree" or (backend == "auto" and large and on_cpu):
        indices, distances = _knn_kdtree(points.float().cpu(), queries.float().cpu(), k)
        return indices.to(points.device), distances.to(points.device)
    return _knn_brute(points, queries, k)


def group_points(
    points: torch.Tensor, num_group: int, group_size: int, *, fps_backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """FPS centres and their centred kNN neighbourhoods, as in Point-MAE's ``Group``.

    Small clouds are handled by clamping: with N valid points, ``min(num_group, N)`` centres of
    ``min(group_size, N)`` points each are formed (so a 500-point cloud gives 500 groups of 128, and a 100-point
    cloud 100 groups of 100). The network is agnostic to both numbers, so this only changes how finely the
    cloud is summarised.

    Args:
        points: (N,3) float32 points, N ≥ 1.
        num_group: Requested number of centres.
        group_size: Requested points per neighbourhood (the centre itself is included).
        fps_backend: See :func:`farthest_point_sample`; ignored for points on an accelerator, which are sampled
            there by :func:`farthest_point_sample_torch` (same indices).

    Returns:
        ``(neighborhoods (G,K,3) = points − centre, centres (G,3))``.
    """
    _check_points(points)
    total = int(points.shape[0])
    if total == 0:
        raise ValueError("cannot group an empty point cloud")
    if num_group < 1 or group_size < 1:
        raise ValueError(f"num_group and group_size must be positive, got {num_group} and {group_size}")
    centre_idx, neighbour_idx = knn_group_indices(points, num_group, group_size, fps_backend=fps_backend)
    centres = points[centre_idx]
    return points[neighbour_idx] - centres[:, None, :], centres


def knn_group_indices(
    points: torch.Tensor, num_group: int, group_size: int, *, fps_backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Point-MAE's grouping as indices: ``(centre_idx (G,), member_idx (G,K))`` into ``points``.

    The indices form is what a method needs when it replaces the grouping (MuSc-V2's iterative point grouping,
    :class:`GroupingFn`) or maps group scores back to pixels; clamping is as in :func:`group_points`.
    """
    _check_points(points)
    total = int(points.shape[0])
    if total == 0:
        raise ValueError("cannot group an empty point cloud")
    if points.device.type == "cpu" and fps_backend != "torch":
        centre_idx = torch.from_numpy(farthest_point_sample(points.numpy(), min(num_group, total), backend=fps_backend))
    else:
        centre_idx = farthest_point_sample_torch(points, min(num_group, total))
    neighbour_idx, _ = knn_indices(points, points[centre_idx], min(group_size, total))
    return centre_idx, neighbour_idx


def three_nn_weights(points: torch.Tensor, centres: torch.Tensor, k: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """PointNet++ feature propagation weights from group centres back to every point.

    Each point blends its k (3) nearest centres with weights ``1/(d² + 1e-8)`` normalised to sum to 1, where d²
    is the squared distance, as the official ``interpolating_points``. With fewer than k centres, all are used.

    Returns:
        ``(neighbors (N,k') int64, weights (N,k') float32)`` with k' = min(k, G).
    """
    k = min(k, int(centres.shape[0]))
    if points.shape[0] == 0 or k == 0:
        return (
            torch.empty(points.shape[0], k, dtype=torch.long, device=points.device),
            torch.empty(points.shape[0], k, device=points.device),
        )
    neighbors, dist = knn_indices(centres, points, k)
    inverse = 1.0 / (dist + 1e-8)
    return neighbors, inverse / inverse.sum(dim=1, keepdim=True)


def regroup_mean(
    features: torch.Tensor, neighbors: torch.Tensor, weights: torch.Tensor, member_idx: torch.Tensor
) -> torch.Tensor:
    """GLFM's two-step smoothing of group features (``GLFM.get_point_features``).

    The G group features are first propagated to every point by its 3-NN weights (:func:`three_nn_weights`), then
    each group's new feature is the mean of the propagated features of its K members. The official code re-runs
    FPS and kNN for the second step; both are deterministic, so its groups are the first step's, ``member_idx``.

    Args:
        features: (G,C) group features.
        neighbors: (N,k) group rows each point blends.
        weights: (N,k) blending weights.
        member_idx: (G,K) point rows of each group.

    Returns:
        (G,C) smoothed features, in ``features``' dtype.
    """
    propagated = torch.zeros(neighbors.shape[0], features.shape[1], dtype=features.dtype, device=features.device)
    for column in range(neighbors.shape[1]):  # one column at a time: N×C, never N×k×C
        rows = features.index_select(0, neighbors[:, column])
        propagated.addcmul_(rows, weights[:, column : column + 1].to(rows.dtype))
    out = torch.empty_like(features)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, member_idx.shape[1] * features.shape[1]))
    for start in range(0, member_idx.shape[0], chunk):  # bounds the gathered (g,K,C) block to ~16 MB
        out[start : start + chunk] = propagated[member_idx[start : start + chunk]].mean(dim=1)
    return out
