"""HGMS, the global 1-NN, the reweighted image score and the map pipeline against brute force."""

from __future__ import annotations

import numpy as np
import torch

from mmiad.methods.cif.hypergraph import hyperedge_features, propagate
from mmiad.methods.cif.memory import cluster_means
from mmiad.methods.cif.model import fuse_maps
from mmiad.methods.cif.search import (
    euclidean,
    hyperedge_search,
    matched_clusters,
    nearest_in_bank,
    reweighted_image_score,
)


def _distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(((a - b) ** 2).sum()))


def _setup(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(20, 5))
    fg = np.ones(20, dtype=bool)
    fg[:4] = False
    h = np.zeros((20, 4))
    h[np.arange(20), rng.integers(0, 4, 20)] = 1
    h[rng.random((20, 4)) < 0.2] = 1
    h[~fg] = 0
    bank = rng.normal(size=(12, 5))
    ids = np.array([0, 0, 1, 1, 1, 3, 3, 0, 1, 3, 3, 0])  # cluster 2 empty
    return x, fg, h, bank, ids


def test_euclidean_and_global_nearest_neighbour() -> None:
    x, fg, _, bank, _ = _setup()
    np.testing.assert_allclose(
        euclidean(torch.from_numpy(x), torch.from_numpy(bank)).numpy(),
        [[_distance(a, b) for b in bank] for a in x],
        rtol=1e-10,
    )
    distances, locations = nearest_in_bank(torch.from_numpy(x), torch.from_numpy(fg), torch.from_numpy(bank))
    for i in range(20):
        expected = min(_distance(x[i], b) for b in bank) if fg[i] else 0.0
        assert abs(distances[i].item() - expected) < 1e-10
        if fg[i]:
            assert int(locations[i]) == int(np.argmin([_distance(x[i], b) for b in bank]))


def test_hgms_is_the_loop_by_loop_search_and_never_below_the_global_distance() -> None:
    x, fg, h, bank, ids = _setup(1)
    edges = hyperedge_features(torch.from_numpy(x), torch.from_numpy(h))
    means, present = cluster_means(torch.from_numpy(bank), torch.from_numpy(ids), 4)
    clusters = matched_clusters(edges, means, present, 3)
    # Reference: (cos + 1)/2 between each test hyperedge and every non-empty memory cluster, top 3.
    for t in range(4):
        sims = {
            c: (edges[t].numpy() @ means[c].numpy() / (np.linalg.norm(edges[t]) * np.linalg.norm(means[c])) + 1) / 2
            for c in (0, 1, 3)
            if np.linalg.norm(edges[t]) > 0
        }
        if sims:
            assert set(clusters[t].tolist()) == set(sorted(sims, key=sims.get, reverse=True)[:3])
        assert 2 not in clusters[t].tolist()  # the empty cluster is never selected
    guided = hyperedge_search(
        torch.from_numpy(x), torch.from_numpy(h), clusters, torch.from_numpy(bank), torch.from_numpy(ids)
    )
    nearest, _ = nearest_in_bank(torch.from_numpy(x), torch.from_numpy(fg), torch.from_numpy(bank))
    for i in range(20):
        if not h[i].any():
            assert guided[i].item() == 0.0
            continue
        own = int(np.flatnonzero(h[i])[0])
        allowed = set(clusters[own].tolist())
        expected = min(_distance(x[i], bank[m]) for m in range(12) if ids[m] in allowed)
        assert abs(guided[i].item() - expected) < 1e-10
        assert guided[i].item() >= nearest[i].item() - 1e-12


def test_top_k_larger_than_the_clusters_is_clipped() -> None:
    edges = torch.randn(4, 3, dtype=torch.float64)
    means, present = cluster_means(torch.randn(5, 3, dtype=torch.float64), torch.tensor([1, 1, 1, 1, 1]), 4)
    assert matched_clusters(edges, means, present, 3).tolist() == [[1]] * 4


def test_reweighted_image_score_is_the_official_softmax_rule() -> None:
    rng = np.random.default_rng(2)
    bank = rng.normal(size=(15, 4))
    original = rng.normal(size=(10, 4))
    propagated = original + 0.1 * rng.normal(size=(10, 4))
    scores = rng.random(10)
    _, locations = nearest_in_bank(
        torch.from_numpy(propagated), torch.ones(10, dtype=torch.bool), torch.from_numpy(bank)
    )
    got = reweighted_image_score(
        torch.from_numpy(scores), locations, torch.from_numpy(original), torch.from_numpy(bank), 9
    )
    p = int(np.argmax(scores))
    m_star = int(np.argmin([_distance(propagated[p], b) for b in bank]))
    support = np.argsort([_distance(bank[m_star], b) for b in bank], kind="stable")[:9]
    assert support[0] == m_star
    d = np.array([_distance(original[p], bank[s]) for s in support])
    weight = 1 - np.exp(d[0]) / np.exp(d).sum()
    assert abs(got - weight * scores[p]) < 1e-10
    small = reweighted_image_score(
        torch.from_numpy(scores), locations, torch.from_numpy(original), torch.from_numpy(bank[:4]).clone(), 9
    )
    assert np.isfinite(small)  # fewer nodes than neighbours: the bank size is used
    assert (
        reweighted_image_score(
            torch.from_numpy(scores), locations, torch.from_numpy(original), torch.from_numpy(bank), 1
        )
        == scores[p]
    )


def _box_reference(image: np.ndarray, size: int) -> np.ndarray:
    pad = size // 2
    padded = np.pad(image, pad)
    out = np.zeros_like(image)
    for r in range(image.shape[0]):
        for c in range(image.shape[1]):
            out[r, c] = padded[r : r + size, c : c + size].mean()
    return out


def _upsample_reference(grid: np.ndarray, size: int) -> np.ndarray:
    """Bilinear with align_corners=True: output pixel i samples input position i·(g−1)/(S−1)."""
    g = grid.shape[0]
    pos = np.arange(size) * (g - 1) / (size - 1)
    low = np.floor(pos).astype(int).clip(0, g - 2)
    frac = pos - low
    rows = grid[low] * (1 - frac)[:, None] + grid[low + 1] * frac[:, None]
    return rows[:, low] * (1 - frac)[None, :] + rows[:, low + 1] * frac[None, :]


def test_map_pipeline_is_product_power_then_box_cascade() -> None:
    rng = np.random.default_rng(3)
    rgb, xyz = rng.random((4, 4)), np.zeros((4, 4))
    xyz[1, 2] = 2.0  # a delta: the fused map is zero except around it
    fused = _upsample_reference(rgb, 24) * _upsample_reference(xyz, 24)
    expected = fused**1.5
    for size, passes in ((5, 5), (7, 3)):
        for _ in range(passes):
            expected = _box_reference(expected, size)
    got = fuse_maps(torch.from_numpy(rgb), torch.from_numpy(xyz), 24, power=1.5, smoothing="box_cascade", sigma=4.0)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-7)


def test_scoring_survives_a_bank_without_some_clusters() -> None:
    """The official code crashes (E ≠ K) when a cluster has no memory node; here the chain runs and every
    patch's HGMS search only sees nodes of non-empty clusters."""
    x, fg, h, bank, ids = _setup(4)
    ids = np.where(ids == 1, 0, ids)  # clusters 1 and 2 empty
    propagated = propagate(torch.from_numpy(x), torch.from_numpy(h), torch.from_numpy(bank), torch.from_numpy(ids), 4)
    means, present = cluster_means(torch.from_numpy(bank), torch.from_numpy(ids), 4)
    clusters = matched_clusters(hyperedge_features(propagated, torch.from_numpy(h)), means, present, 3)
    assert clusters.shape == (4, 2) and set(clusters.flatten().tolist()) <= {0, 3}
    guided = hyperedge_search(propagated, torch.from_numpy(h), clusters, torch.from_numpy(bank), torch.from_numpy(ids))
    nearest, _ = nearest_in_bank(propagated, torch.from_numpy(fg), torch.from_numpy(bank))
    # Both non-empty clusters are searched, i.e. the whole bank: HGMS equals the global search here.
    np.testing.assert_allclose(guided.numpy()[fg], nearest.numpy()[fg], rtol=1e-12)
    assert torch.isfinite(guided).all()
