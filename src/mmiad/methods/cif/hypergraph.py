"""CIF's semantic hypergraph of one image and the training-free message passing over test + memory nodes.

Hyperedges are feature clusters, not spatial neighbourhoods: K-means on the image's foreground RGB patches gives
K centroids, and a patch joins every centroid whose cosine similarity, min-max normalised over the K centroids,
is at least 0.9 (so always its most similar one, sometimes a few more). The 3D features reuse that incidence.

At test time the test patches and the memory nodes form one joint hypergraph (test hyperedges, memory clusters
and top-1 cosine cross-edges both ways), and one step of the symmetric-normalised clique-expansion smoother,
X̂ = α·X + (1−α)·Â·X, pulls each test feature towards what it resembles in memory. The incidence is kept as
(node, hyperedge) index pairs, so Â·X costs O(memberships · D) instead of building (N+A)² matrices.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F

#: Denominator guards of the official code: hyperedge sizes and node degrees in X_E are clamped to this.
FEATURE_EPS = 1e-12
#: Added to hyperedge sizes and node degrees in the propagation kernel (official ``BiTFMP.eps``).
KERNEL_EPS = 1e-8


def kmeans_centroids(features: torch.Tensor, n_clusters: int, seed: int = 0) -> torch.Tensor:
    """k×D centroids of scikit-learn's K-means (k-means++, ``n_init="auto"``, ``random_state=seed``), float32.

    k is ``n_clusters``, or the number of rows when there are fewer (the official code crashes there).
    """
    from sklearn.cluster import KMeans

    rows = features.detach().float().cpu().numpy()
    if rows.shape[0] == 0:
        return torch.zeros(0, features.shape[1])
    k = min(n_clusters, rows.shape[0])
    with warnings.catch_warnings():  # fewer distinct points than k: sklearn warns and returns duplicates
        warnings.simplefilter("ignore")
        centres = KMeans(n_clusters=k, random_state=seed, n_init="auto").fit(rows).cluster_centers_
    return torch.from_numpy(np.asarray(centres, dtype=np.float32))


def incidence_from_centroids(
    features: torch.Tensor, foreground: torch.Tensor, centroids: torch.Tensor, n_clusters: int, threshold: float = 0.9
) -> torch.Tensor:
    """N×K 0/1 incidence: patch i is in hyperedge e when its min-max-normalised cosine to centroid e ≥ threshold.

    Background rows are empty. Columns beyond the given centroids (fewer foreground patches than K) stay empty.
    A foreground row whose cosines are all equal (denominator 0, replaced by 1e-8 as officially) joins its first
    most similar centroid instead of none (official).
    """
    incidence = torch.zeros(features.shape[0], n_clusters, dtype=features.dtype, device=features.device)
    if centroids.shape[0] == 0:
        return incidence
    cosine = F.normalize(features, dim=1) @ F.normalize(centroids.to(features), dim=1).T
    low = cosine.min(dim=1, keepdim=True).values
    span = cosine.max(dim=1, keepdim=True).values - low
    span = torch.where(span == 0, torch.full_like(span, 1e-8), span)
    # The most similar centroid is always a member. Officially it is (ŝ = 1) unless every centroid is equally
    # similar (one centroid, or identical ones): then the official row joins nothing, and the patch would be left
    # out of the memory or score 0 at test; here it joins its most similar (lowest-index) centroid.
    nearest = F.one_hot(cosine.argmax(dim=1), centroids.shape[0]).bool()
    member = (((cosine - low) / span >= threshold) | nearest) & foreground.view(-1, 1)
    incidence[:, : centroids.shape[0]] = member.to(features.dtype)
    return incidence


def build_incidence(
    features: torch.Tensor, foreground: torch.Tensor, n_clusters: int, threshold: float = 0.9, seed: int = 0
) -> torch.Tensor:
    """N×K incidence of one image: K-means on the foreground rows, then :func:`incidence_from_centroids`."""
    centroids = kmeans_centroids(features[foreground], n_clusters, seed)
    return incidence_from_centroids(features, foreground, centroids, n_clusters, threshold)


def hyperedge_features(features: torch.Tensor, incidence: torch.Tensor) -> torch.Tensor:
    """K×D hyperedge features D_E⁻¹ Hᵀ D_V^{-1/2} X: the mean of the members' x_v/√deg(v); empty edges give 0."""
    degree = incidence.sum(dim=1).clamp_min(FEATURE_EPS)
    size = incidence.sum(dim=0).clamp_min(FEATURE_EPS)
    return (incidence.T @ (features / degree.sqrt().unsqueeze(1))) / size.unsqueeze(1)


def hard_ids(incidence: torch.Tensor) -> torch.Tensor:
    """N hard hyperedge ids: the lowest-index hyperedge of each row (official argmax on a 0/1 row), −1 if none."""
    columns = torch.arange(incidence.shape[1], device=incidence.device).expand_as(incidence)
    lowest = torch.where(incidence > 0, columns, incidence.shape[1]).min(dim=1).values
    return torch.where(lowest == incidence.shape[1], -1, lowest)


def joint_memberships(
    test: torch.Tensor, test_incidence: torch.Tensor, bank: torch.Tensor, bank_ids: torch.Tensor, n_bank_edges: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(node, hyperedge) index pairs of the joint hypergraph and its hyperedge count.

    Nodes: the N test patches, then the A memory nodes. Hyperedges, in the official order: the K test hyperedges;
    the memory clusters (``n_bank_edges`` slots, one per cluster id, so a cluster missing from the bank is an
    empty hyperedge rather than a crash); N forward cross-edges {test i, its most cosine-similar memory node}; A
    reverse cross-edges {memory a, its most cosine-similar test patch, background included}.
    """
    n, k = test_incidence.shape
    a = bank.shape[0]
    device = test.device
    test_nodes, test_edges = torch.nonzero(test_incidence > 0, as_tuple=True)
    similarity = F.normalize(test, dim=1) @ F.normalize(bank, dim=1).T
    forward = similarity.argmax(dim=1)
    reverse = similarity.argmax(dim=0)
    patches = torch.arange(n, device=device)
    memory = torch.arange(a, device=device)
    cross = k + n_bank_edges
    nodes = torch.cat([test_nodes, n + memory, patches, n + forward, n + memory, reverse])
    edges = torch.cat(
        [test_edges, k + bank_ids.to(device), cross + patches, cross + patches, cross + n + memory, cross + n + memory]
    )
    return nodes, edges, cross + n + a


def propagate(
    test: torch.Tensor,
    test_incidence: torch.Tensor,
    bank: torch.Tensor,
    bank_ids: torch.Tensor,
    n_bank_edges: int,
    *,
    hops: int = 1,
    alpha: float = 0.9,
) -> torch.Tensor:
    """N×D propagated test features: S·X over the joint hypergraph, test rows kept (Bi-TF-MP).

    Â = D^{-1/2} (H·diag(1/δ)·Hᵀ + I) D^{-1/2} with δ_e = |e| + 1e-8 and D the row sums of the bracket (+1e-8);
    S = α·I + Σ_{l=1}^{L−1} α(1−α)^l Â^l + (1−α)^L Â^L (L = ``hops``; L = 1 gives α·I + (1−α)·Â). Memory
    features enter unnormalised and are not updated for scoring.
    """
    if hops < 1:
        raise ValueError(f"hops must be at least 1, got {hops}")
    nodes, edges, n_edges = joint_memberships(test, test_incidence, bank, bank_ids, n_bank_edges)
    x = torch.cat([test, bank.to(test)])
    ones = torch.ones(nodes.shape[0], dtype=x.dtype, device=x.device)
    size = torch.zeros(n_edges, dtype=x.dtype, device=x.device).index_add_(0, edges, ones)
    inverse_size = 1.0 / (size + KERNEL_EPS)
    # Row sums of H·diag(1/δ)·Hᵀ: Σ_e H_ve·|e|/δ_e; plus 1 for the identity.
    degree = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device).index_add_(0, nodes, (size * inverse_size)[edges])
    scale = (degree + 1.0 + KERNEL_EPS).rsqrt().unsqueeze(1)

    def smooth(values: torch.Tensor) -> torch.Tensor:
        z = values * scale
        per_edge = torch.zeros(n_edges, z.shape[1], dtype=z.dtype, device=z.device).index_add_(0, edges, z[nodes])
        per_edge *= inverse_size.unsqueeze(1)
        spread = torch.zeros_like(z).index_add_(0, nodes, per_edge[edges])
        return (spread + z) * scale

    result = alpha * x
    power = x
    for level in range(1, hops):
        power = smooth(power)
        result = result + alpha * (1 - alpha) ** level * power
    result = result + (1 - alpha) ** hops * smooth(power)
    return result[: test.shape[0]]
