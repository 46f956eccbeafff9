"""Weight-free 3D features: FPFH exactly as BTF computes it with open3d, in vectorised numpy.

BTF (3D-ADS) runs ``estimate_normals(KDTreeSearchParamHybrid(0.1, 30))`` and then
``compute_fpfh_feature(KDTreeSearchParamHybrid(0.25, 100))`` on the valid points of the 224×224 cloud. open3d is
a heavy binary dependency that air-gapped lines and our build machines may not have, so the same definition is
re-implemented here on top of ``scipy.spatial.cKDTree``. Facts reproduced from open3d (``Feature.cpp``,
``EstimateNormals.cpp``):

* Hybrid search: the ``max_nn`` nearest points strictly within ``radius``, sorted, the query point first.
* Normals: the smallest-eigenvalue eigenvector of the (1/n) covariance of at least 3 neighbours (identity
  covariance otherwise), computed with open3d's closed-form ``FastEigen3x3``. open3d never orients normals unless
  asked, so the sign is whatever that closed form yields; BTF does not orient either. ``orientation="open3d"``
  replicates that sign bit for bit; ``orientation="camera"`` flips normals towards the camera at the origin
  (the MVTec 3D-AD camera looks along +z), which is what ``orient_normals_towards_camera_location()`` does.
* SPFH: for every neighbour except the first (the point itself) the Darboux pair features (alpha, phi, theta),
  each binned into 11 equal bins, each histogram adding ``100 / (n − 1)`` per pair, so each third sums to 100.
* FPFH: neighbours' SPFH weighted by 1 / squared distance (zero distances skipped), each third rescaled to sum to
  100, then the point's own SPFH added. Every third of a point with neighbours therefore sums to exactly 200
  (100 where all neighbours coincide with it), and a point without neighbours gets zeros.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from scipy.spatial import cKDTree

from mmiad.features.base import NONZERO_RULES, PointFeatures, feature_points, identity_point_features
from mmiad.features.registry import register_point_extractor

BINS = 11
_TWO_THIRDS_PI = 2.09439510239319549  # the literal open3d's FastEigen3x3 uses
_PAIRS_PER_CHUNK = 400_000  # bounds the temporary (pairs × 3) float64 arrays to ~10 MB each
ORIENTATIONS = ("open3d", "camera")
BACKENDS = ("auto", "numpy", "open3d")


def _query(points: np.ndarray, radius: float, max_nn: int) -> tuple[np.ndarray, np.ndarray]:
    """N×k neighbour indices (N where missing) and distances (inf where missing), nearest first."""
    k = min(max_nn, len(points))
    dist, index = cKDTree(points).query(points, k=k, distance_upper_bound=radius, workers=-1)
    return np.asarray(index, dtype=np.int64).reshape(len(points), k), np.asarray(dist).reshape(len(points), k)


def hybrid_neighbors(points: np.ndarray, radius: float, max_nn: int) -> tuple[np.ndarray, np.ndarray]:
    """open3d's ``KDTreeSearchParamHybrid``: up to ``max_nn`` nearest points within ``radius``, sorted.

    Returns:
        ``(index, count)``: index is N×max_nn (slots past ``count`` hold N), count is the neighbours found per
        point, the point itself included.
    """
    index, dist = _query(points, radius, max_nn)
    return index, np.isfinite(dist).sum(axis=1)


def _nested_neighbors(
    points: np.ndarray, small: tuple[float, int], large: tuple[float, int]
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Hybrid neighbourhoods for two parameter sets from one k-d tree query.

    The ``max_nn`` nearest within the smaller radius are the first entries of the sorted larger query whenever
    both of ``small``'s parameters are at most ``large``'s, which saves a third of the extractor's time.
    """
    index, dist = _query(points, *large)
    k = min(small[1], index.shape[1])
    small_count = np.minimum((dist < small[0]).sum(axis=1), k)
    small_index = np.where(np.arange(k)[None, :] < small_count[:, None], index[:, :k], len(points))
    return (small_index, small_count), (index, np.isfinite(dist).sum(axis=1))


def _cross(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cross product; np.cross is several times slower on many short rows."""
    return np.stack(
        [
            a[..., 1] * b[..., 2] - a[..., 2] * b[..., 1],
            a[..., 2] * b[..., 0] - a[..., 0] * b[..., 2],
            a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0],
        ],
        axis=-1,
    )


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("...i,...i->...", a, b)


def _eigenvector_of_simple_root(A: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Eigenvector of a simple eigenvalue: the largest cross product of two rows of A − λI (open3d's choice)."""
    M = A - value[:, None, None] * np.eye(3)
    candidates = np.stack([_cross(M[:, 0], M[:, 1]), _cross(M[:, 0], M[:, 2]), _cross(M[:, 1], M[:, 2])], axis=1)
    d = _dot(candidates, candidates)
    pick = np.where(d[:, 1] > d[:, 0], 1, 0)
    pick = np.where(d[:, 2] > d[np.arange(len(d)), pick], 2, pick)
    rows = np.arange(len(d))
    return candidates[rows, pick] / np.sqrt(d[rows, pick])[:, None]


def _eigenvector_in_complement(A: np.ndarray, evec0: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Eigenvector for ``value`` inside the plane orthogonal to ``evec0``, with open3d's sign conventions."""
    x, y, z = evec0[:, 0], evec0[:, 1], evec0[:, 2]
    use_x = np.abs(x) > np.abs(y)
    inv_x = 1.0 / np.sqrt(x * x + z * z)
    inv_y = 1.0 / np.sqrt(y * y + z * z)
    zeros = np.zeros_like(x)
    U = np.where(
        use_x[:, None],
        np.stack([-z * inv_x, zeros, x * inv_x], axis=1),
        np.stack([zeros, z * inv_y, -y * inv_y], axis=1),
    )
    V = _cross(evec0, U)
    AU = np.einsum("nij,nj->ni", A, U)
    AV = np.einsum("nij,nj->ni", A, V)
    m00 = _dot(U, AU) - value
    m01 = _dot(U, AV)
    m11 = _dot(V, AV) - value
    a00, a01, a11 = np.abs(m00), np.abs(m01), np.abs(m11)

    # Branch 1 (|m00| >= |m11|): normalise (m00, m01) by the larger of the two, return m01·U − m00·V.
    r = np.where(a00 >= a01, m01 / m00, m00 / m01)
    s = 1.0 / np.sqrt(1.0 + r * r)
    p00 = np.where(a00 >= a01, s, r * s)
    p01 = np.where(a00 >= a01, r * s, s)
    first = p01[:, None] * U - p00[:, None] * V
    # Branch 2 (|m11| > |m00|): the same with (m11, m01), return m11·U − m01·V.
    r = np.where(a11 >= a01, m01 / m11, m11 / m01)
    s = 1.0 / np.sqrt(1.0 + r * r)
    q11 = np.where(a11 >= a01, s, r * s)
    q01 = np.where(a11 >= a01, r * s, s)
    second = q11[:, None] * U - q01[:, None] * V

    branch1 = a00 >= a11
    degenerate = np.where(branch1, np.maximum(a00, a01), np.maximum(a11, a01)) <= 0
    out = np.where(branch1[:, None], first, second)
    return np.where(degenerate[:, None], U, out)


def smallest_eigenvectors(cov: np.ndarray) -> np.ndarray:
    """open3d's ``FastEigen3x3`` on N×3×3 covariances: the normal, with the sign open3d's closed form gives.

    The sign matters because FPFH's angles depend on it and open3d leaves it unoriented; an ordinary
    ``numpy.linalg.eigh`` would give equally valid but differently signed normals and hence different FPFH.
    """
    n = len(cov)
    out = np.tile(np.array([0.0, 0.0, 1.0]), (n, 1))
    max_coeff = cov.reshape(n, 9).max(axis=1)
    nonzero = max_coeff != 0
    A = cov / np.where(nonzero, max_coeff, 1.0)[:, None, None]
    a00, a01, a02, a11, a12, a22 = A[:, 0, 0], A[:, 0, 1], A[:, 0, 2], A[:, 1, 1], A[:, 1, 2], A[:, 2, 2]
    off = a01 * a01 + a02 * a02 + a12 * a12

    axis = np.where((a00 < a11) & (a00 < a22), 0, np.where((a11 < a00) & (a11 < a22), 1, 2))
    diagonal = nonzero & (off <= 0)
    out[diagonal] = np.eye(3)[axis[diagonal]]

    general = nonzero & (off > 0)
    if not general.any():
        return out
    A, a00, a01, a02, a11, a12, a22, off = (v[general] for v in (A, a00, a01, a02, a11, a12, a22, off))
    q = (a00 + a11 + a22) / 3
    b00, b11, b22 = a00 - q, a11 - q, a22 - q
    p = np.sqrt((b00 * b00 + b11 * b11 + b22 * b22 + off * 2) / 6)
    c00 = b11 * b22 - a12 * a12
    c01 = a01 * b22 - a12 * a02
    c02 = a01 * a12 - b11 * a02
    half_det = np.clip((b00 * c00 - a01 * c01 + a02 * c02) / (p * p * p) * 0.5, -1.0, 1.0)
    angle = np.arccos(half_det) / 3
    beta2 = np.cos(angle) * 2
    beta0 = np.cos(angle + _TWO_THIRDS_PI) * 2
    beta1 = -(beta0 + beta2)
    e0, e1, e2 = q + p * beta0, q + p * beta1, q + p * beta2

    # open3d first solves the eigenvalue that is guaranteed simple (the largest if half_det >= 0, else the
    # smallest), then the middle one in its orthogonal complement, then the third by a cross product.
    upper = half_det >= 0
    first = _eigenvector_of_simple_root(A, np.where(upper, e2, e0))
    first_is_min = np.where(upper, (e2 < e0) & (e2 < e1), (e0 < e1) & (e0 < e2))
    middle = _eigenvector_in_complement(A, first, e1)
    middle_is_min = (e1 < e0) & (e1 < e2)
    third = np.where(upper[:, None], _cross(middle, first), _cross(first, middle))
    normal = np.where(first_is_min[:, None], first, np.where(middle_is_min[:, None], middle, third))
    out[general] = normal
    return out


def estimate_normals(
    points: np.ndarray,
    radius: float,
    max_nn: int,
    orientation: str = "open3d",
    neighbors: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Unit normals of an N×3 cloud, as ``PointCloud.estimate_normals(KDTreeSearchParamHybrid)`` gives them.

    Args:
        points: N×3 coordinates.
        radius: Hybrid search radius.
        max_nn: Hybrid search neighbour cap.
        orientation: ``"open3d"`` keeps open3d's unoriented sign (what BTF uses); ``"camera"`` flips each normal
            to face the camera at the origin.
        neighbors: The result of ``hybrid_neighbors(points, radius, max_nn)`` when the caller already has it.
    """
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")
    points = np.asarray(points, dtype=np.float64)
    index, count = neighbors if neighbors is not None else hybrid_neighbors(points, radius, max_nn)
    padded = np.concatenate([points, np.zeros((1, 3))])
    member = np.arange(index.shape[1])[None, :] < count[:, None]
    neigh = padded[index] * member[..., None]
    n = np.maximum(count, 1)[:, None]
    mean = neigh.sum(axis=1) / n
    centred = (neigh - mean[:, None, :]) * member[..., None]
    cov = np.einsum("nki,nkj->nij", centred, centred) / n[..., None]
    cov[count < 3] = np.eye(3)
    with np.errstate(divide="ignore", invalid="ignore"):
        normals = smallest_eigenvectors(cov)
    broken = ~np.isfinite(normals).all(axis=1)  # exactly repeated eigenvalues; open3d would emit NaN here
    normals[broken] = (0.0, 0.0, 1.0)
    if orientation == "camera":
        normals *= np.where(_dot(normals, -points) < 0, -1.0, 1.0)[:, None]
    return normals


def _pair_bins(p1: np.ndarray, n1: np.ndarray, p2: np.ndarray, n2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """open3d's pair features, binned: (3×P bin indices, P squared distances) for P point pairs.

    Inputs are 3×P (one row per coordinate): whole-row arithmetic on contiguous arrays is what keeps the
    millions of pairs of a 224×224 cloud within about a second.
    """
    dx, dy, dz = p2[0] - p1[0], p2[1] - p1[1], p2[2] - p1[2]
    d2 = dx * dx + dy * dy + dz * dz
    dist = np.sqrt(d2)
    safe = np.where(dist == 0, 1.0, dist)
    # Divide (not multiply by a reciprocal) as open3d does: theta's sign hinges on comparing |angle1| with |angle2|,
    # which are nearly equal on smooth surfaces, so the last bit decides many pairs.
    angle1 = (n1[0] * dx + n1[1] * dy + n1[2] * dz) / safe
    angle2 = (n2[0] * dx + n2[1] * dy + n2[2] * dz) / safe
    with np.errstate(invalid="ignore"):
        swap = np.arccos(np.abs(angle1)) > np.arccos(np.abs(angle2))  # NaN compares False, as in C++
    theta = np.where(swap, -angle2, angle1)
    sign = np.where(swap, -1.0, 1.0)
    dx, dy, dz = dx * sign, dy * sign, dz * sign
    ux, uy, uz = np.where(swap, n2, n1)
    ox, oy, oz = np.where(swap, n1, n2)
    vx, vy, vz = dy * uz - dz * uy, dz * ux - dx * uz, dx * uy - dy * ux
    v_norm = np.sqrt(vx * vx + vy * vy + vz * vz)
    inv = 1.0 / np.where(v_norm == 0, 1.0, v_norm)
    vx, vy, vz = vx * inv, vy * inv, vz * inv
    wx, wy, wz = uy * vz - uz * vy, uz * vx - ux * vz, ux * vy - uy * vx
    phi = vx * ox + vy * oy + vz * oz
    alpha = np.arctan2(wx * ox + wy * oy + wz * oz, ux * ox + uy * oy + uz * oz)
    zero = (dist == 0) | (v_norm == 0)  # open3d returns an all-zero feature for these pairs
    bins = np.empty((3, len(d2)), dtype=np.int64)
    bins[0] = np.floor(BINS * (np.where(zero, 0.0, alpha) + np.pi) / (2.0 * np.pi))
    bins[1] = np.floor(BINS * (np.where(zero, 0.0, phi) + 1.0) * 0.5)
    bins[2] = np.floor(BINS * (np.where(zero, 0.0, theta) + 1.0) * 0.5)
    return np.clip(bins, 0, BINS - 1, out=bins), d2


def fpfh_features(
    points: np.ndarray,
    normals: np.ndarray,
    radius: float,
    max_nn: int,
    neighbors: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """N×33 FPFH with open3d's definition (see the module docstring); float64.

    Args:
        points: N×3 coordinates.
        normals: N×3 unit normals.
        radius: Hybrid search radius.
        max_nn: Hybrid search neighbour cap.
        neighbors: The result of ``hybrid_neighbors(points, radius, max_nn)`` when the caller already has it.
    """
    points = np.asarray(points, dtype=np.float64)
    normals = np.asarray(normals, dtype=np.float64)
    n_points = len(points)
    index, count = neighbors if neighbors is not None else hybrid_neighbors(points, radius, max_nn)
    # Every slot after the first (the point itself) that holds a neighbour forms one pair; row-major order.
    slot = np.arange(index.shape[1])[None, :]
    rows, slots = np.nonzero((slot < count[:, None]) & (slot >= 1))
    cols = index[rows, slots]
    incr = 100.0 / np.maximum(count - 1, 1)
    pts_t, nrm_t = np.ascontiguousarray(points.T), np.ascontiguousarray(normals.T)

    spfh = np.zeros(n_points * 3 * BINS)
    d2 = np.empty(len(rows))
    offsets = np.array([0, BINS, 2 * BINS])[:, None]
    for start in range(0, len(rows), _PAIRS_PER_CHUNK):
        r, c = rows[start : start + _PAIRS_PER_CHUNK], cols[start : start + _PAIRS_PER_CHUNK]
        bins, d2[start : start + len(r)] = _pair_bins(pts_t[:, r], nrm_t[:, r], pts_t[:, c], nrm_t[:, c])
        flat = (r[None, :] * (3 * BINS) + offsets + bins).ravel()
        lo = int(r[0]) * 3 * BINS
        spfh[lo:] += np.bincount(flat - lo, weights=np.tile(incr[r], 3), minlength=spfh.size - lo)
    histograms = spfh.reshape(n_points, 3 * BINS)

    # Neighbours' SPFH weighted by 1/d² (coincident points skipped) as one sparse product; rows stay sorted.
    keep = d2 != 0
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows[keep], minlength=n_points))])
    weight = sp.csr_matrix((1.0 / d2[keep], cols[keep], indptr), shape=(n_points, n_points))
    mixed = np.asarray(weight @ histograms).reshape(n_points, 3, BINS)
    totals = mixed.sum(axis=2, keepdims=True)
    mixed *= np.where(totals != 0, 100.0 / np.where(totals != 0, totals, 1.0), 0.0)
    return mixed.reshape(n_points, 3 * BINS) + histograms


def _open3d_fpfh(points: np.ndarray, extractor: FPFHExtractor) -> np.ndarray:
    """The same features computed by open3d itself (the optional fast path)."""
    import open3d as o3d

    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(np.asarray(points, dtype=np.float64)))
    cloud.estimate_normals(
        o3d.geometry.KDTreeSearchParamHybrid(radius=extractor.normal_radius_, max_nn=extractor.normal_max_nn)
    )
    if extractor.orientation == "camera":
        cloud.orient_normals_towards_camera_location(np.zeros(3))
    param = o3d.geometry.KDTreeSearchParamHybrid(radius=extractor.feature_radius_, max_nn=extractor.feature_max_nn)
    return np.asarray(o3d.pipelines.registration.compute_fpfh_feature(cloud, param).data).T


def open3d_available() -> bool:
    """Whether the optional open3d fast path can be used."""
    return importlib.util.find_spec("open3d") is not None


class FPFHExtractor:
    """BTF's 33-d FPFH per valid point, as a :class:`~mmiad.features.base.PointFeatureExtractor`.

    The defaults are BTF's (metres, as MVTec 3D-AD). Data in other units can keep the same physical neighbourhoods
    with ``radius_scale`` (e.g. 1000 for millimetres), which multiplies both radii.

    Args:
        normal_radius: Hybrid search radius for normals.
        normal_max_nn: Neighbour cap for normals.
        feature_radius: Hybrid search radius for FPFH.
        feature_max_nn: Neighbour cap for FPFH.
        radius_scale: Factor applied to both radii.
        orientation: ``"open3d"`` (BTF's unoriented normals) or ``"camera"`` (normals face the origin).
        backend: ``"numpy"`` (default, the core path), ``"open3d"`` or ``"auto"`` (open3d if importable). All give the
            same features; the tests hold them to each other.
        nonzero: Which points get features (:data:`~mmiad.features.base.NONZERO_RULES`): ``"all"``, BTF's
            ``np.all(pc != 0, axis=1)``, or ``"any"``.
    """

    out_channels = 3 * BINS

    def __init__(
        self,
        normal_radius: float = 0.1,
        normal_max_nn: int = 30,
        feature_radius: float = 0.25,
        feature_max_nn: int = 100,
        radius_scale: float = 1.0,
        orientation: str = "open3d",
        backend: str = "numpy",
        nonzero: str = "all",
    ) -> None:
        if orientation not in ORIENTATIONS:
            raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        for name, value in (("normal_radius", normal_radius), ("feature_radius", feature_radius)):
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if not radius_scale > 0:
            raise ValueError(f"radius_scale must be positive, got {radius_scale}")
        for name, value in (("normal_max_nn", normal_max_nn), ("feature_max_nn", feature_max_nn)):
            if value < 2:
                raise ValueError(f"{name} must be at least 2, got {value}")
        if nonzero not in NONZERO_RULES:
            raise ValueError(f"nonzero must be one of {NONZERO_RULES}, got {nonzero!r}")
        if backend == "open3d" and not open3d_available():
            raise ValueError("backend='open3d' needs the open3d package; use backend='numpy'")
        self.normal_radius = float(normal_radius)
        self.normal_max_nn = int(normal_max_nn)
        self.feature_radius = float(feature_radius)
        self.feature_max_nn = int(feature_max_nn)
        self.radius_scale = float(radius_scale)
        self.orientation = orientation
        self.backend = backend
        self.nonzero = nonzero
        self.backend_ = "open3d" if backend == "open3d" or (backend == "auto" and open3d_available()) else "numpy"

    @property
    def normal_radius_(self) -> float:
        """The normal radius actually used (after ``radius_scale``)."""
        return self.normal_radius * self.radius_scale

    @property
    def feature_radius_(self) -> float:
        """The FPFH radius actually used (after ``radius_scale``)."""
        return self.feature_radius * self.radius_scale

    def config(self) -> dict[str, Any]:
        """Name and every parameter that changes the features.

        The backend is left out on purpose: numpy and open3d agree to rounding (see the tests), so a model
        trained where open3d is installed loads and scores the same on a line PC without it.
        """
        return {
            "name": "fpfh",
            "normal_radius": self.normal_radius,
            "normal_max_nn": self.normal_max_nn,
            "feature_radius": self.feature_radius,
            "feature_max_nn": self.feature_max_nn,
            "radius_scale": self.radius_scale,
            "orientation": self.orientation,
            "nonzero": self.nonzero,
        }

    def compute(self, points: np.ndarray) -> np.ndarray:
        """N×33 float64 FPFH of an unorganized N×3 cloud."""
        points = np.asarray(points, dtype=np.float64)
        if points.ndim != 2 or points.shape[1] != 3:
            raise ValueError(f"points must be N×3, got shape {points.shape}")
        if not np.isfinite(points).all():
            raise ValueError("points contain NaN or infinite coordinates")
        if len(points) == 0:
            return np.zeros((0, self.out_channels))
        if self.backend_ == "open3d":
            return _open3d_fpfh(points, self)
        small, large = (self.normal_radius_, self.normal_max_nn), (self.feature_radius_, self.feature_max_nn)
        if small[0] <= large[0] and small[1] <= large[1]:
            near, far = _nested_neighbors(points, small, large)
        else:
            near, far = hybrid_neighbors(points, *small), hybrid_neighbors(points, *large)
        normals = estimate_normals(points, *small, self.orientation, neighbors=near)
        return fpfh_features(points, normals, *large, neighbors=far)

    def extract(self, xyz: np.ndarray, valid: np.ndarray) -> PointFeatures:
        """FPFH of the valid pixels of an S×S×3 organized cloud, one feature row per used pixel.

        Of the ``valid`` pixels, those failing the ``nonzero`` rule are left out, as BTF leaves them out.
        """
        xyz = np.asarray(xyz)
        valid = np.asarray(valid)
        if xyz.ndim != 3 or xyz.shape[2] != 3 or xyz.shape[0] != xyz.shape[1]:
            raise ValueError(f"xyz must be an S×S×3 organized cloud, got shape {xyz.shape}")
        if valid.shape != xyz.shape[:2] or valid.dtype != np.bool_:
            raise ValueError(f"valid must be a bool array of shape {xyz.shape[:2]}, got {valid.dtype} {valid.shape}")
        used = feature_points(xyz, valid, self.nonzero)
        features = self.compute(xyz[used])
        return identity_point_features(torch.from_numpy(features.astype(np.float32)), used)


def _build_fpfh(*, weights_dir: Any = None, random_init: bool = False, seed: int = 0, **options: Any) -> FPFHExtractor:
    """Registry factory: FPFH has no weights, so only its own options (e.g. ``nonzero``) apply."""
    return FPFHExtractor(**options)


register_point_extractor("fpfh", _build_fpfh, "FPFH (33-d, BTF's parameters); no weights", needs_weights=False)
