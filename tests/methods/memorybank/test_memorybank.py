from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.random_projection import johnson_lindenstrauss_min_dim

from mmiad.methods.memorybank import (
    MemoryBank,
    NearestNeighbors,
    faiss_available,
    greedy_coreset,
    jl_min_dim,
    reweighted_score,
    sparse_projection,
)


def brute_force_greedy(points: np.ndarray, n: int) -> list[int]:
    """Reference k-centre on a full N×N distance matrix (fine for tiny N)."""
    full = np.sqrt(((points[:, None, :] - points[None, :, :]) ** 2).sum(-1))
    chosen = [0]
    min_dist = full[0].copy()
    while len(chosen) < n:
        nxt = int(np.argmax(min_dist))
        chosen.append(nxt)
        min_dist = np.minimum(min_dist, full[nxt])
    return chosen


def test_jl_dimension_matches_sklearn() -> None:
    for n in (10, 784, 78_400, 3_000_000):
        assert jl_min_dim(n, 0.9) == int(johnson_lindenstrauss_min_dim(n, eps=0.9))
    with pytest.raises(ValueError):
        jl_min_dim(10, 1.5)


def test_sparse_projection_values_and_density() -> None:
    matrix = sparse_projection(400, 100, seed=3).numpy()
    density = 1 / math.sqrt(400)
    value = math.sqrt(1 / density) / math.sqrt(100)
    magnitudes = np.abs(matrix)
    assert np.all((magnitudes == 0) | np.isclose(magnitudes, value, rtol=1e-6))
    assert abs((matrix != 0).mean() - density) < 0.01
    assert np.array_equal(matrix, sparse_projection(400, 100, seed=3).numpy())


def test_coreset_takes_one_point_per_far_cluster_first() -> None:
    rng = np.random.default_rng(0)
    centres = np.array([[0, 0], [100, 0], [0, 100], [100, 100]], dtype=np.float32)
    labels = np.repeat(np.arange(4), 10)
    points = centres[labels] + rng.normal(scale=0.5, size=(40, 2)).astype(np.float32)
    chosen = greedy_coreset(torch.from_numpy(points), 4).tolist()
    assert chosen[0] == 0
    assert sorted(labels[chosen]) == [0, 1, 2, 3]


def test_coreset_equals_brute_force_with_small_chunks() -> None:
    points = torch.randn(300, 8, generator=torch.Generator().manual_seed(1))
    reference = brute_force_greedy(points.half().float().numpy(), 40)
    assert greedy_coreset(points, 40).tolist() == reference
    # chunk smaller than N, and features given as several chunks: same selection, no N×N matrix needed
    pieces = [points[:70], points[70:71], points[71:].numpy()]
    assert greedy_coreset(pieces, 40, chunk_size=17).tolist() == reference


def test_coreset_on_projected_features_equals_brute_force() -> None:
    points = torch.randn(500, 400, generator=torch.Generator().manual_seed(2))
    dim = jl_min_dim(500, 0.9)
    assert dim < 400
    projected = (points @ sparse_projection(400, dim, seed=5)).half().float().numpy()
    assert greedy_coreset(points, 30, seed=5, chunk_size=64).tolist() == brute_force_greedy(projected, 30)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_knn_matches_brute_force(backend: str) -> None:
    if backend == "faiss" and not faiss_available():
        pytest.skip("faiss not installed")
    gen = torch.Generator().manual_seed(4)
    bank, queries = torch.randn(230, 16, generator=gen), torch.randn(57, 16, generator=gen)
    full = torch.cdist(queries.double(), bank.double())
    expected_dist, expected_idx = torch.sort(full, dim=1)
    search = NearestNeighbors(bank, backend=backend, chunk_size=19)
    dist, idx = search.search(queries, 3)
    assert torch.equal(idx, expected_idx[:, :3])
    np.testing.assert_allclose(dist.numpy(), expected_dist[:, :3].numpy(), rtol=1e-5)
    # a query that is a bank row gets exactly zero distance to itself
    self_dist, self_idx = search.search(bank[[5, 100]], 1)
    assert self_idx[:, 0].tolist() == [5, 100] and self_dist.abs().max() == 0


def test_knn_backends_agree() -> None:
    if not faiss_available():
        pytest.skip("faiss not installed")
    gen = torch.Generator().manual_seed(6)
    bank, queries = torch.randn(500, 33, generator=gen) * 50, torch.randn(100, 33, generator=gen) * 50
    a = NearestNeighbors(bank, backend="torch", chunk_size=64).search(queries, 3)
    b = NearestNeighbors(bank, backend="faiss").search(queries, 3)
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])


def test_reweighting_matches_hand_computation() -> None:
    bank = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [5.0, 5.0]])
    queries = torch.tensor([[0.1, 0.0], [0.0, -3.0]])
    search = NearestNeighbors(bank, backend="torch")
    dist, idx = search.search(queries, 1)
    # worst patch: (0,-3), s* = 3, m* = (0,0); m*'s 3-NN are (0,0),(1,0),(0,2) → drop m* itself
    d1, d2 = math.dist((0, -3), (1, 0)), math.dist((0, -3), (0, 2))
    scale = math.sqrt(2)
    expected = (1 - math.exp(3 / scale) / (math.exp(d1 / scale) + math.exp(d2 / scale))) * 3
    assert reweighted_score(queries, dist[:, 0], idx[:, 0], search) == pytest.approx(expected, rel=1e-6)


def test_bank_statistics_spill_and_fraction(tmp_path) -> None:
    gen = torch.Generator().manual_seed(7)
    blocks = [torch.randn(50, 6, generator=gen) * 3 + 1 for _ in range(4)]
    in_memory = MemoryBank(fraction=0.1, budget_gb=1.0)
    spilled = MemoryBank(fraction=0.1, budget_gb=0.0, spill_dir=tmp_path)
    for block in blocks:
        in_memory.add(block, uncounted_zero_rows=5)
        spilled.add(block, uncounted_zero_rows=5)
    assert list(tmp_path.iterdir())  # rows went to disk
    everything = torch.cat([*blocks, torch.zeros(20, 6)]).double()
    mean, std = in_memory.statistics()
    assert mean == pytest.approx(float(everything.mean())) and std == pytest.approx(float(everything.std()))
    in_memory.finalize(mean=mean, std=std)
    spilled.finalize(mean=mean, std=std)
    assert len(in_memory) == 20  # int(0.1 · 200 stored rows)
    assert torch.equal(in_memory.bank, spilled.bank)
    assert not list(tmp_path.iterdir())  # spill folder removed
    stacked = (torch.cat(blocks) - mean) / std
    first = stacked[0]
    assert torch.allclose(in_memory.bank[0], first)  # the coreset starts at row 0, normalised
    distances, _ = in_memory.score(torch.cat(blocks)[:3])
    assert distances[0] == 0


def test_btf_and_m3dm_share_the_bank_settings(tmp_path) -> None:
    from mmiad.methods.btf.model import BTFConfig
    from mmiad.methods.m3dm.model import M3DMConfig
    from mmiad.methods.memorybank.settings import BankSettings

    for config_class in (BTFConfig, M3DMConfig):
        config = config_class(coreset_fraction=0.25, seed=7, memory_budget_gb=0.5)
        assert isinstance(config, BankSettings)
        bank = config.new_bank(tmp_path / config_class.__name__, seed_offset=2)
        assert (bank.fraction, bank.seed, bank.store.budget_bytes) == (0.25, 9, 0.5 * 2**30)
        assert (tmp_path / config_class.__name__ / "spill").is_dir()
        with pytest.raises(ValueError, match="coreset_fraction"):
            config_class(coreset_fraction=0.0)
