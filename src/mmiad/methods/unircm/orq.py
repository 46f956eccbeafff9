"""Uni-RCM's offline residual quantizer (ORQ, paper Sec. II-C): cascaded k-means codebooks of nominal features.

Each layer quantises what the previous layers left over (eq. 4), so L small codebooks cover the nominal feature
space finely; a defect's feature is far from every code path and keeps a large residual, whose norm is the ORQ
anomaly score. Choices, following the official code where the paper is silent:

* Layer 1 clusters the **L2-normalised** features (direction decides the coarse category/part) but stores the
  mean of the **raw** features of each cluster as its code; later layers cluster raw residuals.
* Encoding (fit and inference alike) always follows eq. 4: the nearest code in raw space at every layer, so the
  residuals a layer is fitted on are exactly the residuals it sees at test time.
* Empty clusters are re-seeded with the points farthest from their assigned centre.

k-means is chunked full-batch Lloyd in torch (the N×K distance matrix never exists whole) on the features'
device; on a CPU it runs near the speed of its matrix products. ``faiss`` runs the same Lloyd iterations from
the same initial centres when installed and asked for.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

INITS = ("kmeans++", "random")


#: Distance values per assignment block: the block (≈16 MB of float32) stays in the last-level cache between
#: the matrix product that writes it and the row minimum that reads it.
_BLOCK_VALUES = 1 << 22


def _nearest(points: torch.Tensor, centres: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(index of the nearest centre, squared distance to it) per point, computed block by block.

    The argmin runs over ``||c||² − 2·x·cᵀ`` written by one fused matrix product (``addmm``) into a block buffer
    allocated once, so each block costs one GEMM plus one pass of the row minimum; ``||x||²``, constant per row,
    is added to the minimum only. ``chunk`` caps the points per block (fewer when K is large, see
    ``_BLOCK_VALUES``); the result does not depend on it.
    """
    count, k = points.shape[0], centres.shape[0]
    centre_norms = (centres * centres).sum(dim=1)
    rows = max(1, min(chunk, count, max(1, _BLOCK_VALUES // max(k, 1))))
    scores = torch.empty(rows, k, dtype=points.dtype, device=points.device)
    indices = torch.empty(count, dtype=torch.long, device=points.device)
    distances = torch.empty(count, dtype=points.dtype, device=points.device)
    centres_t = centres.T
    for start in range(0, count, rows):
        block = points[start : start + rows]
        size = block.shape[0]
        block_scores = scores[:size]
        torch.addmm(centre_norms, block, centres_t, beta=1, alpha=-2, out=block_scores)
        torch.min(block_scores, dim=1, out=(distances[start : start + size], indices[start : start + size]))
    distances.add_((points * points).sum(dim=1)).clamp_min_(0.0)
    return indices, distances


#: Relative slack on squared distances from the expanded formula: float32 rounding of ``||x||² − 2x·c + ||c||²``
#: over a few thousand dimensions stays far below it, so a bound built with it never excludes the true value.
_EXPANSION_SLACK = 1e-4


def _nearest_two(
    points: torch.Tensor, centres: torch.Tensor, point_norms: torch.Tensor, chunk: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per point: nearest centre, an upper bound on its distance and a lower bound on every other centre's.

    Same blocked ``addmm`` as :func:`_nearest`, with the two smallest scores per row; the bounds widen the
    computed (squared) distances by ``_EXPANSION_SLACK`` so that they hold for the exact distances.
    """
    count, k = points.shape[0], centres.shape[0]
    centre_norms = (centres * centres).sum(dim=1)
    rows = max(1, min(chunk, count, max(1, _BLOCK_VALUES // max(k, 1))))
    scores = torch.empty(rows, k, dtype=points.dtype, device=points.device)
    first = torch.empty(count, dtype=points.dtype, device=points.device)
    second = torch.full((count,), float("inf"), dtype=points.dtype, device=points.device)  # K=1: no other centre
    index = torch.empty(count, dtype=torch.long, device=points.device)
    for start in range(0, count, rows):
        stop = min(start + rows, count)
        block_scores = scores[: stop - start]
        torch.addmm(centre_norms, points[start:stop], centres.T, beta=1, alpha=-2, out=block_scores)
        # The first index wins ties, as in _nearest (topk would split the points of duplicate centres).
        torch.min(block_scores, dim=1, out=(first[start:stop], index[start:stop]))
        if k > 1:
            block_scores.scatter_(1, index[start:stop, None], float("inf"))
            torch.amin(block_scores, dim=1, out=second[start:stop])
    slack = _EXPANSION_SLACK * (point_norms + centre_norms.max())
    upper = (first + point_norms + slack).clamp_min(0.0).sqrt()
    lower = (second + point_norms - slack).clamp_min(0.0).sqrt()
    return index, upper, lower


def _assigned_distances(
    points: torch.Tensor, centres: torch.Tensor, assignment: torch.Tensor, chunk: int
) -> torch.Tensor:
    """Squared distance of every point to its assigned centre, by explicit differences (accurate)."""
    result = torch.empty(points.shape[0], dtype=points.dtype, device=points.device)
    for start in range(0, points.shape[0], chunk):
        diff = points[start : start + chunk] - centres[assignment[start : start + chunk]]
        result[start : start + chunk] = (diff * diff).sum(dim=1)
    return result


def _lloyd(
    points: torch.Tensor, centres: torch.Tensor, iterations: int, chunk: int
) -> tuple[torch.Tensor, list[float]]:
    """Lloyd iterations from ``centres``, skipping points whose nearest centre provably cannot change.

    Hamerly's bounds (2010): each point keeps an upper bound on the distance to its centre and a lower bound on
    the distance to every other centre. When centres move, the upper bound grows by its centre's drift and the
    lower bound shrinks by the largest drift of the other centres. A point whose upper bound stays below its
    lower bound keeps its centre without any distance computation; the others first get their exact distance
    to their centre, and only those still in doubt are compared with all K centres. Late iterations then touch
    a few percent of the points. The result is Lloyd's: a point is skipped only when every centre other than its
    own is farther by more than the rounding of the distance computation. Returns the centres and, per
    iteration, the fraction of points compared with all centres.
    """
    count, k = points.shape[0], centres.shape[0]
    point_norms = (points * points).sum(dim=1)
    sums = torch.empty_like(centres)
    assignment = torch.empty(count, dtype=torch.long, device=points.device)
    upper = torch.empty(count, dtype=points.dtype, device=points.device)
    lower = torch.empty(count, dtype=points.dtype, device=points.device)
    compared: list[float] = []
    for iteration in range(iterations):
        if iteration == 0:
            assignment, upper, lower = _nearest_two(points, centres, point_norms, chunk)
            compared.append(1.0)
        else:
            doubt = torch.nonzero(upper >= lower).flatten()
            if doubt.numel():
                exact = _assigned_distances(points[doubt], centres, assignment[doubt], chunk).sqrt_() * (1 + 1e-6)
                upper[doubt] = exact
                doubt = doubt[exact >= lower[doubt]]
            if doubt.numel():
                index, up, low = _nearest_two(points[doubt], centres, point_norms[doubt], chunk)
                assignment[doubt], upper[doubt], lower[doubt] = index, up, low
            compared.append(doubt.numel() / count)
        sums.zero_().index_add_(0, assignment, points)
        counts = torch.bincount(assignment, minlength=k)
        nonempty = counts > 0
        sums.div_(counts.clamp_min(1).unsqueeze(1).to(points.dtype))
        moved = torch.where(nonempty.unsqueeze(1), sums, centres)
        empty = torch.nonzero(~nonempty).flatten()
        if empty.numel():
            # Re-seed dead clusters with the worst-fitted points so every code keeps covering data.
            distances = _assigned_distances(points, centres, assignment, chunk)
            farthest = torch.argsort(distances, descending=True, stable=True)[: empty.numel()]
            moved[empty] = points[farthest]
        drift = torch.linalg.vector_norm((moved.double() - centres.double()), dim=1).to(points.dtype) * (1 + 1e-6)
        upper.add_(drift[assignment])
        if k > 1:
            top = torch.topk(drift, 2)
            largest_other = torch.where(assignment == top.indices[0], top.values[1], top.values[0])
            lower.sub_(largest_other)
        centres = moved
    return centres, compared


def _kmeans_plus_plus(points: torch.Tensor, k: int, generator: torch.Generator, chunk: int) -> torch.Tensor:
    """k-means++ seeding: each new centre drawn with probability ∝ squared distance to the chosen ones."""
    first = int(torch.randint(points.shape[0], (1,), generator=generator))
    centres = [points[first]]
    _, closest = _nearest(points, points[first : first + 1], chunk)
    for _ in range(1, k):
        weights = closest.double().cpu()
        if float(weights.sum()) <= 0:
            pick = int(torch.randint(points.shape[0], (1,), generator=generator))
        else:
            pick = int(torch.multinomial(weights, 1, generator=generator))
        centres.append(points[pick])
        _, to_new = _nearest(points, points[pick : pick + 1], chunk)
        closest = torch.minimum(closest, to_new)
    return torch.stack(centres)


def faiss_available() -> bool:
    """Whether ``faiss`` (the optional ``fast`` extra) can be imported."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _initial_centres(points: torch.Tensor, k: int, seed: int, init: str, chunk: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if init == "random":
        return points[torch.randperm(points.shape[0], generator=generator)[:k].to(points.device)].clone()
    return _kmeans_plus_plus(points, k, generator, chunk)


def _faiss_lloyd(points: torch.Tensor, centres: torch.Tensor, iterations: int) -> torch.Tensor:
    """faiss's Lloyd iterations from the given centres, on every point (no subsampling).

    faiss differs from :func:`kmeans` only in how it revives an empty cluster (it splits a large one instead of
    taking the worst-fitted point); without empty clusters both run the same algorithm.
    """
    import faiss

    count, dim = points.shape
    k = centres.shape[0]
    model = faiss.Kmeans(dim, k, niter=iterations, spherical=False, verbose=False)
    model.cp.max_points_per_centroid = count // k + 1  # faiss would otherwise subsample to 256 points per centre
    model.cp.min_points_per_centroid = 1
    model.train(points.cpu().numpy(), init_centroids=centres.cpu().numpy())
    return torch.from_numpy(model.centroids).to(points.device)


def kmeans(
    points: torch.Tensor,
    k: int,
    *,
    iterations: int = 20,
    seed: int = 0,
    init: str = "random",
    chunk: int = 8192,
    use_faiss: bool = False,
) -> torch.Tensor:
    """Lloyd's k-means; returns the (k, D) centres, on the points' device.

    Each iteration assigns every point to its nearest centre, then replaces each centre by the mean of its points
    (``index_add_`` into a buffer allocated once); a centre left without points is re-seeded with the point
    farthest from its assigned centre. Points whose centre provably cannot change are not compared with all
    centres again (:func:`_lloyd`), which makes the later iterations cheap without changing the result.

    Args:
        points: (N, D) float points, N >= k.
        k: Number of clusters.
        iterations: Lloyd iterations (official: 20).
        seed: Seeds the initialisation (the result is deterministic for a seed).
        init: ``random`` (k distinct data points, official) or ``kmeans++``.
        chunk: Upper bound on points per distance block (bounds memory to chunk·k floats).
        use_faiss: Run the Lloyd iterations in ``faiss`` when it is importable, from the same initial centres.
            Assignments agree with the torch path up to float rounding near ties and faiss's different revival
            of empty clusters (``tests/methods/unircm/test_unircm_orq_speed.py`` states the tolerance).
    """
    if points.dim() != 2 or points.shape[0] < k or k < 1:
        raise ValueError(f"k-means needs (N, D) points with N >= k >= 1; got {tuple(points.shape)} and k={k}")
    if init not in INITS:
        raise ValueError(f"unknown k-means init {init!r}; expected one of {INITS}")
    points = points.float()
    centres = _initial_centres(points, k, seed, init, chunk)
    if use_faiss and faiss_available() and iterations > 0:
        return _faiss_lloyd(points, centres, iterations)
    return _lloyd(points, centres, iterations, chunk)[0]


class ResidualQuantizer:
    """L cascaded codebooks fitted offline on nominal features of one modality.

    Args:
        codebook_sizes: K per layer (paper: [4096]*4 for 2D, [1024]*4 for 3D); a layer with more codes than
            training points is clipped to the number of points.
        iterations: k-means iterations per layer.
        seed: Seed of every layer's k-means (layer l uses seed + l).
        init: k-means init (``random`` as official, or ``kmeans++``).
        normalize_first: Cluster layer 1 on L2-normalised features (official) while storing raw means.
        chunk: Distance block size.
        use_faiss: Use faiss k-means when importable.

    Learned state: ``codebooks_`` (list of (K_l, D) tensors), ``fit_time_`` (seconds).
    """

    def __init__(
        self,
        codebook_sizes: Sequence[int],
        *,
        iterations: int = 20,
        seed: int = 0,
        init: str = "random",
        normalize_first: bool = True,
        chunk: int = 8192,
        use_faiss: bool = False,
    ) -> None:
        if not codebook_sizes or min(codebook_sizes) < 1:
            raise ValueError(f"need at least one codebook of positive size, got {list(codebook_sizes)}")
        self.codebook_sizes = [int(k) for k in codebook_sizes]
        self.iterations, self.seed, self.init = iterations, seed, init
        self.normalize_first, self.chunk, self.use_faiss = normalize_first, chunk, use_faiss
        self.codebooks_: list[torch.Tensor] = []
        self.fit_time_ = 0.0

    def _fit_layer(self, residual: torch.Tensor, k: int, layer: int, first: bool) -> torch.Tensor:
        k = min(k, residual.shape[0])
        seed = self.seed + layer
        if not (first and self.normalize_first):
            return kmeans(
                residual,
                k,
                iterations=self.iterations,
                seed=seed,
                init=self.init,
                chunk=self.chunk,
                use_faiss=self.use_faiss,
            )
        directions = F.normalize(residual, dim=1)
        centres = kmeans(
            directions,
            k,
            iterations=self.iterations,
            seed=seed,
            init=self.init,
            chunk=self.chunk,
            use_faiss=self.use_faiss,
        )
        assignment, _ = _nearest(directions, centres, self.chunk)
        counts = torch.bincount(assignment, minlength=k)
        sums = torch.zeros(k, residual.shape[1], dtype=residual.dtype, device=residual.device)
        sums.index_add_(0, assignment, residual)
        # k-means leaves no cluster empty, but keep the normalised centre as a fallback anyway.
        return torch.where((counts > 0).unsqueeze(1), sums / counts.clamp_min(1).unsqueeze(1), centres)

    def fit(self, features: torch.Tensor) -> ResidualQuantizer:
        """Fit all layers on (N, D) nominal features."""
        if features.dim() != 2 or features.shape[0] == 0:
            raise ValueError(f"ORQ needs (N, D) features with N > 0, got {tuple(features.shape)}")
        started = time.perf_counter()
        residual = features.float()
        self.codebooks_ = []
        for layer, k in enumerate(self.codebook_sizes):
            codebook = self._fit_layer(residual, k, layer, first=layer == 0)
            self.codebooks_.append(codebook)
            index, _ = _nearest(residual, codebook, self.chunk)
            residual = residual - codebook[index]
        self.fit_time_ = time.perf_counter() - started
        return self

    def extend(self, features: torch.Tensor, codes_per_layer: Sequence[int]) -> ResidualQuantizer:
        """Append codes fitted on new categories' features to every layer (existing codes stay untouched).

        The new features are encoded layer by layer with the codebook extended so far; at layer l, k-means on
        their current residuals gives ``codes_per_layer[l]`` new codes, which are appended. Old categories keep
        their codes, so their residuals can only shrink (a nearest-code search over a superset).
        """
        if not self.codebooks_:
            raise ValueError("extend() needs a fitted quantizer")
        if len(codes_per_layer) != len(self.codebooks_):
            raise ValueError(f"need one new-code count per layer ({len(self.codebooks_)}), got {list(codes_per_layer)}")
        started = time.perf_counter()
        residual = features.float()
        for layer, k in enumerate(codes_per_layer):
            if k > 0:
                new = self._fit_layer(residual, k, layer + 1000, first=layer == 0)
                self.codebooks_[layer] = torch.cat([self.codebooks_[layer], new])
            index, _ = _nearest(residual, self.codebooks_[layer], self.chunk)
            residual = residual - self.codebooks_[layer][index]
        self.fit_time_ += time.perf_counter() - started
        return self

    def residual(self, features: torch.Tensor, layers: int | None = None) -> torch.Tensor:
        """(N, D) residual after encoding through the first ``layers`` codebooks (all by default), eq. 4."""
        if not self.codebooks_:
            raise ValueError("the quantizer is not fitted")
        residual = features.float()
        for codebook in self.codebooks_[: layers if layers is not None else len(self.codebooks_)]:
            index, _ = _nearest(residual, codebook.to(residual.device), self.chunk)
            residual = residual - codebook.to(residual.device)[index]
        return residual

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """ORQ anomaly score per row: the norm of the final residual (S_orq = ||F − F̂||₂)."""
        return torch.linalg.vector_norm(self.residual(features), dim=1)


def time_orq_fit(
    n: int = 100_000, dim: int = 768, k: int = 4096, layers: int = 4, *, iterations: int = 20, seed: int = 0
) -> float:
    """Seconds to fit an ORQ at the given sizes on N random Gaussian features (for the benchmark)."""
    features = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    return ResidualQuantizer([k] * layers, iterations=iterations, seed=seed).fit(features).fit_time_
