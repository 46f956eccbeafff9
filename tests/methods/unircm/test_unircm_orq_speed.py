"""The fused, buffered k-means against a brute-force Lloyd, and the faiss path against the torch path."""

from __future__ import annotations

import pytest
import torch

from mmiad.methods.unircm.orq import _initial_centres, _lloyd, _nearest, faiss_available, kmeans
from mmiad.utils.compute import available_devices

DEVICES = available_devices()


def brute_force_kmeans(points: torch.Tensor, k: int, iterations: int, seed: int) -> torch.Tensor:
    """Textbook Lloyd in float64 with full distance matrices: the same random init (k distinct points drawn by a
    seeded permutation) and the same revival of an empty cluster (the points farthest from their centre)."""
    generator = torch.Generator().manual_seed(seed)
    data = points.double()
    centres = data[torch.randperm(len(data), generator=generator)[:k]].clone()
    for _ in range(iterations):
        dist = torch.cdist(data, centres) ** 2
        label = dist.argmin(dim=1)
        nearest = dist.gather(1, label[:, None])[:, 0]
        empty = [j for j in range(k) if not bool((label == j).any())]
        for j in range(k):
            if j not in empty:
                centres[j] = data[label == j].mean(dim=0)
        if empty:
            centres[empty] = data[torch.argsort(nearest, descending=True)[: len(empty)]]
    return centres


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk", [8192, 50])
def test_kmeans_equals_brute_force_lloyd(device: str, chunk: int) -> None:
    points = torch.randn(600, 12, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.5, 2.0, 12)
    for seed in (0, 1):
        ours = kmeans(points.to(device), 24, iterations=8, seed=seed, chunk=chunk)
        assert ours.device.type == device
        torch.testing.assert_close(ours.cpu().double(), brute_force_kmeans(points, 24, 8, seed), atol=1e-4, rtol=0)


def test_bounds_skip_settled_points_without_changing_the_result() -> None:
    generator = torch.Generator().manual_seed(6)
    centres = torch.randn(15, 10, generator=generator) * 4
    points = centres.repeat_interleave(80, dim=0) + torch.randn(1200, 10, generator=generator)
    for seed in (0, 1):
        start = _initial_centres(points, 30, seed, "random", 8192)
        got, compared = _lloyd(points, start, 12, 8192)
        torch.testing.assert_close(got.double(), brute_force_kmeans(points, 30, 12, seed), atol=1e-4, rtol=0)
        assert compared[0] == 1.0
        assert min(compared[1:]) < 0.2  # most points were settled by their bounds, not compared with all centres


def as_set(centres: torch.Tensor) -> torch.Tensor:
    """Rows in lexicographic order: identical initial centres tie exactly, and which of the tied codes keeps the
    points and which one goes empty (and is revived) is a tie-break, not part of the algorithm."""
    rows = centres.double().tolist()
    return torch.tensor(sorted(rows), dtype=torch.float64)


def test_empty_clusters_are_revived_as_the_brute_force_does() -> None:
    # Many duplicates: random init draws several identical centres, so clusters go empty on the first iteration
    # and are revived with the farthest points (distinct outliers at distinct distances, so no tie there).
    generator = torch.Generator().manual_seed(2)
    base = torch.randn(6, 3, generator=generator) * 5
    outliers = torch.randn(8, 3, generator=generator) * 30
    points = torch.cat([base.repeat_interleave(30, dim=0), outliers])
    revived = 0
    for seed in range(6):
        expected = brute_force_kmeans(points, 10, 3, seed)
        initial = kmeans(points, 10, iterations=0, seed=seed)
        revived += len(initial) - len(torch.unique(initial, dim=0))
        torch.testing.assert_close(
            as_set(kmeans(points, 10, iterations=3, seed=seed)), as_set(expected), atol=1e-4, rtol=0
        )
    assert revived > 0, "no seed drew duplicate initial centres: the revival was not exercised"


def test_nearest_with_many_centres_uses_small_blocks_and_matches_brute_force() -> None:
    points, centres = torch.randn(300, 16), torch.randn(5000, 16)  # 5000 centres: blocks of 838 rows
    index, distance = _nearest(points, centres, chunk=8192)
    exact = torch.cdist(points.double(), centres.double()) ** 2
    assert torch.equal(index, exact.argmin(dim=1))
    torch.testing.assert_close(distance.double(), exact.min(dim=1).values, atol=1e-4, rtol=1e-5)


@pytest.mark.skipif(not faiss_available(), reason="faiss not installed")
def test_faiss_assignments_equal_the_torch_path() -> None:
    """Tolerance: at least 99.9 % of points get the same final code and centres agree to 1e-4 (float rounding
    of the different GEMMs; on these sizes they agree exactly in practice)."""
    for seed, (n, dim, k) in enumerate([(4000, 32, 64), (3000, 96, 200)]):
        points = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
        ours = kmeans(points, k, iterations=10, seed=seed)
        theirs = kmeans(points, k, iterations=10, seed=seed, use_faiss=True)
        same = (_nearest(points, ours, 8192)[0] == _nearest(points, theirs, 8192)[0]).float().mean()
        assert float(same) >= 0.999
        torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
