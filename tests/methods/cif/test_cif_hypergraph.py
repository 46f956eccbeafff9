"""CIF's hypergraph and message passing against float64 NumPy re-derivations of the official formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans

from mmiad.methods.cif.hypergraph import (
    build_incidence,
    hard_ids,
    hyperedge_features,
    incidence_from_centroids,
    kmeans_centroids,
    propagate,
)


def _membership_reference(x: np.ndarray, fg: np.ndarray, centroids: np.ndarray, threshold: float) -> np.ndarray:
    """Row by row: cosines, min-max over the centroids (0 span → 1e-8), threshold, background emptied."""
    out = np.zeros((x.shape[0], centroids.shape[0]))
    for i, row in enumerate(x):
        if not fg[i]:
            continue
        cos = np.array([row @ c / (np.linalg.norm(row) * np.linalg.norm(c)) for c in centroids])
        span = cos.max() - cos.min()
        out[i] = (cos - cos.min()) / (span if span != 0 else 1e-8) >= threshold
        out[i, int(np.argmax(cos))] = 1  # ours: a degenerate row (span 0) still joins its most similar centroid
    return out


def test_membership_matches_the_reference_and_always_holds_the_nearest_centroid() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 6))
    fg = rng.random(30) < 0.7
    centroids = rng.normal(size=(4, 6))
    for threshold in (0.9, 0.5):
        got = incidence_from_centroids(
            torch.from_numpy(x), torch.from_numpy(fg), torch.from_numpy(centroids), 4, threshold
        ).numpy()
        np.testing.assert_array_equal(got, _membership_reference(x, fg, centroids, threshold))
    cosine = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (centroids / np.linalg.norm(centroids, axis=1)[:, None]).T
    assert got[np.flatnonzero(fg), cosine[fg].argmax(axis=1)].all()
    assert not got[~fg].any() and (got[fg].sum(axis=1) >= 1).all()
    assert (got[fg].sum(axis=1) > 1).any()  # threshold 0.5: fuzzy, several memberships
    # One centroid: every cosine span is 0; the official rows join nothing, ours join the only hyperedge.
    single = incidence_from_centroids(torch.from_numpy(x), torch.from_numpy(fg), torch.from_numpy(centroids[:1]), 4)
    np.testing.assert_array_equal(single[:, 0].numpy(), fg.astype(float))
    assert not single[:, 1:].any()


def test_kmeans_is_sklearns_on_the_foreground_and_survives_fewer_patches_than_clusters() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 5)).astype(np.float32)
    fg = np.zeros(40, dtype=bool)
    fg[5:30] = True
    centres = kmeans_centroids(torch.from_numpy(x[fg]), 4).numpy()
    expected = KMeans(n_clusters=4, random_state=0, n_init="auto").fit(x[fg]).cluster_centers_
    np.testing.assert_allclose(centres, expected, rtol=1e-6)
    few = np.zeros(40, dtype=bool)
    few[:3] = True  # 3 foreground patches, K = 4: the official code crashes; here the 4th hyperedge stays empty
    incidence = build_incidence(torch.from_numpy(x), torch.from_numpy(few), 4)
    assert incidence.shape == (40, 4) and not incidence[:, 3].any() and incidence[:3].sum(dim=1).ge(1).all()


def test_hyperedge_features_are_the_degree_weighted_formula() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(12, 3))
    h = (rng.random((12, 4)) < 0.4).astype(float)
    h[:, 3] = 0  # an empty hyperedge
    h[0] = 0  # a node without hyperedge
    d_v = np.diag(1 / np.sqrt(np.maximum(h.sum(axis=1), 1e-12)))
    d_e = np.diag(1 / np.maximum(h.sum(axis=0), 1e-12))
    expected = d_e @ h.T @ d_v @ x
    got = hyperedge_features(torch.from_numpy(x), torch.from_numpy(h)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    assert not got[3].any()


def test_hard_id_is_the_lowest_membership() -> None:
    h = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 1], [0, 0, 0, 0], [0, 0, 0, 1]], dtype=torch.float32)
    assert hard_ids(h).tolist() == [1, 0, -1, 3]


def _propagation_reference(
    x: np.ndarray, h_test: np.ndarray, bank: np.ndarray, ids: np.ndarray, n_edges: int, hops: int, alpha: float
) -> np.ndarray:
    """The official Bi-TF-MP with dense matrices: joint incidence built edge by edge, then S·X."""
    n, k = h_test.shape
    a = bank.shape[0]
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    bn = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    sim = xn @ bn.T
    h = np.zeros((n + a, k + n_edges + n + a))
    h[:n, :k] = h_test
    for m in range(a):
        h[n + m, k + ids[m]] = 1
    for i in range(n):
        h[i, k + n_edges + i] = 1
        h[n + sim[i].argmax(), k + n_edges + i] = 1
    for m in range(a):
        h[n + m, k + n_edges + n + m] = 1
        h[sim[:, m].argmax(), k + n_edges + n + m] = 1
    w = h @ np.diag(1 / (h.sum(axis=0) + 1e-8)) @ h.T + np.eye(n + a)
    d = np.diag(1 / np.sqrt(w.sum(axis=1) + 1e-8))
    a_hat = d @ w @ d
    s = alpha * np.eye(n + a)
    power = np.eye(n + a)
    for level in range(1, hops):
        power = power @ a_hat
        s += alpha * (1 - alpha) ** level * power
    s += (1 - alpha) ** hops * (power @ a_hat)
    return (s @ np.vstack([x, bank]))[:n]


@pytest.mark.parametrize("hops", [1, 2])
def test_propagation_is_the_dense_kernel_with_a_missing_memory_cluster(hops: int) -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(25, 7))
    bank = rng.normal(size=(9, 7))
    ids = np.array([0, 0, 1, 1, 3, 3, 3, 0, 1])  # cluster 2 is empty: the official make_joint_H crashes here
    h_test = (rng.random((25, 4)) < 0.3).astype(float)
    h_test[:5] = 0  # background patches: only cross-edges
    got = propagate(
        torch.from_numpy(x), torch.from_numpy(h_test), torch.from_numpy(bank), torch.from_numpy(ids), 4, hops=hops
    )
    expected = _propagation_reference(x, h_test, bank, ids, 4, hops, 0.9)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-10)
    if hops == 1:  # the published setting: X̂ = 0.9·X + 0.1·Â·X
        assert not np.allclose(got.numpy(), x)


def test_one_hop_kernel_rows_are_symmetric_and_not_row_stochastic() -> None:
    """One-hot features over all N + A nodes read S's test rows out: 0.9·I + 0.1·Â, Â symmetric, rows not summing
    to 1 (the fact sheet's warning against testing row-stochasticity)."""
    n, a = 6, 3
    eye = np.eye(n + a)
    h_test = np.array([[1, 0], [1, 1], [0, 1], [0, 1], [0, 0], [1, 0]], dtype=float)
    ids = np.array([0, 1, 1])
    rows = propagate(
        torch.from_numpy(eye[:n]), torch.from_numpy(h_test), torch.from_numpy(eye[n:]), torch.tensor(ids), 2
    )
    np.testing.assert_allclose(
        rows.numpy(), _propagation_reference(eye[:n], h_test, eye[n:], ids, 2, 1, 0.9), atol=1e-12
    )
    a_hat = (rows.numpy() - 0.9 * eye[:n]) / 0.1
    np.testing.assert_allclose(a_hat[:, :n], a_hat[:, :n].T, atol=1e-12)
    assert not np.allclose(a_hat.sum(axis=1), 1.0)
