from __future__ import annotations

import importlib.util
import itertools

import pytest
import torch
import torch.nn.functional as F

from mmiad.methods.unircm.orq import ResidualQuantizer, _nearest, kmeans


def blobs(centres: torch.Tensor, per: int, spread: float, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.cat([c + spread * torch.randn(per, centres.shape[1], generator=generator) for c in centres])


def brute_force_nearest(points: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    return torch.cdist(points.double(), centres.double()).argmin(dim=1)


def test_nearest_matches_brute_force_across_chunks() -> None:
    points, centres = torch.randn(50, 3), torch.randn(7, 3)
    index, distance = _nearest(points, centres, chunk=8)
    assert torch.equal(index, brute_force_nearest(points, centres))
    torch.testing.assert_close(distance, ((points - centres[index]) ** 2).sum(1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("init", ["random", "kmeans++"])
def test_kmeans_recovers_separable_blobs(init: str) -> None:
    true = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    points = blobs(true, 50, 0.3)
    # A few restarts stand in for a lucky init; the best one (lowest inertia) must find all four centres.
    runs = [kmeans(points, 4, iterations=20, seed=s, init=init, chunk=64) for s in range(4)]
    best = min(runs, key=lambda c: float(_nearest(points, c, 64)[1].sum()))
    match = brute_force_nearest(true, best)
    assert sorted(match.tolist()) == [0, 1, 2, 3]
    torch.testing.assert_close(best[match], true, atol=0.15, rtol=0)
    # Every found centre is the mean of the points brute-force assigned to it.
    labels = brute_force_nearest(points, best)
    torch.testing.assert_close(best, torch.stack([points[labels == j].mean(0) for j in range(4)]), atol=1e-4, rtol=0)
    assert torch.equal(kmeans(points, 4, seed=1, init=init), kmeans(points, 4, seed=1, init=init))


def test_empty_cluster_is_reseeded_with_the_farthest_point() -> None:
    # Three identical points and one far outlier, k=2, random init: whenever both initial centres land on the
    # duplicates, one cluster goes empty and must take the outlier (the worst-fitted point).
    points = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [9.0, 9.0]])
    seeds = [s for s in range(40) if float(kmeans(points, 2, iterations=0, seed=s).abs().sum()) == 0]
    assert seeds, "no seed draws both initial centres from the duplicates"
    # Iteration 1: every point ties to centre 0 (mean 2.25, 2.25); centre 1 is empty and takes the outlier.
    assert sorted(kmeans(points, 2, iterations=1, seed=seeds[0]).tolist()) == [[2.25, 2.25], [9.0, 9.0]]
    assert sorted(kmeans(points, 2, iterations=2, seed=seeds[0]).tolist()) == [[0.0, 0.0], [9.0, 9.0]]


def test_kmeans_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="N >= k"):
        kmeans(torch.randn(3, 2), 4)
    with pytest.raises(ValueError, match="init"):
        kmeans(torch.randn(8, 2), 2, init="forgy")


def test_residual_norm_decreases_with_layers() -> None:
    features = torch.randn(400, 8, generator=torch.Generator().manual_seed(0))
    orq = ResidualQuantizer([16, 16, 16, 16], iterations=10, seed=0).fit(features)
    errors = [float(torch.linalg.vector_norm(orq.residual(features, layers=n), dim=1).mean()) for n in range(5)]
    assert all(later < earlier for earlier, later in itertools.pairwise(errors))
    torch.testing.assert_close(orq.score(features), torch.linalg.vector_norm(orq.residual(features), dim=1))
    assert orq.fit_time_ > 0


def test_first_layer_clusters_directions_but_stores_raw_means() -> None:
    # Two directions at two magnitudes each: normalised clustering groups by direction only.
    base = torch.tensor([[1.0, 0.0], [1.0, 0.0], [3.0, 0.0], [3.0, 0.0], [0.0, 1.0], [0.0, 5.0]])
    orq = ResidualQuantizer([2], iterations=5, seed=0).fit(base)
    assert sorted(orq.codebooks_[0].tolist()) == [[0.0, 3.0], [2.0, 0.0]]
    raw = ResidualQuantizer([2], iterations=5, seed=0, normalize_first=False).fit(base)
    codes = sorted(raw.codebooks_[0].tolist())
    assert codes != [[0.0, 3.0], [2.0, 0.0]]
    assert orq.codebooks_[0].shape == (2, 2) and torch.allclose(
        F.normalize(orq.codebooks_[0], dim=1).norm(dim=1), torch.ones(2)
    )


def test_extend_appends_codes_and_never_hurts_old_features() -> None:
    generator = torch.Generator().manual_seed(0)
    old = torch.randn(300, 6, generator=generator)
    new = torch.randn(200, 6, generator=generator) + 6.0
    orq = ResidualQuantizer([8, 8], iterations=10, seed=0).fit(old)
    before_old, before_new = orq.score(old), orq.score(new)
    first_layer = orq.codebooks_[0].clone()
    orq.extend(new, [4, 4])
    assert [len(c) for c in orq.codebooks_] == [12, 12]
    assert torch.equal(orq.codebooks_[0][:8], first_layer)
    assert float(orq.score(new).mean()) < 0.5 * float(before_new.mean())
    assert float(orq.score(old).mean()) <= float(before_old.mean()) * 1.05


@pytest.mark.skipif(importlib.util.find_spec("faiss") is None, reason="faiss not installed")
def test_faiss_path_agrees_on_blobs() -> None:
    true = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = blobs(true, 100, 0.2)
    ours = kmeans(points, 3, seed=0, init="kmeans++")
    theirs = kmeans(points, 3, seed=0, use_faiss=True)
    torch.testing.assert_close(ours[brute_force_nearest(theirs, ours)], theirs, atol=0.05, rtol=0)
