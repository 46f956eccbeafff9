"""The greedy coreset's in-place, cache-blocked loop selects exactly what the straightforward loop selects."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmiad.methods.memorybank.coreset import _greedy_select, greedy_coreset, jl_min_dim, sparse_projection


def straightforward_greedy(projected: torch.Tensor, n_select: int) -> list[int]:
    """The loop as first written: the whole float16 bank converted to float32 and reduced at every step."""
    bank = projected.float()
    min_dist = torch.full((bank.shape[0],), float("inf"))
    chosen, current = [], 0
    for _ in range(n_select):
        chosen.append(current)
        min_dist = torch.minimum(min_dist, ((bank - bank[current]) ** 2).sum(dim=1))
        current = int(torch.argmax(min_dist))
    return chosen


def exact_greedy(points: np.ndarray, n_select: int) -> list[int]:
    """Float64 k-centre on a full distance matrix; first index wins ties (np.argmax)."""
    full = ((points[:, None, :].astype(np.float64) - points[None, :, :]) ** 2).sum(-1)
    chosen, min_dist = [0], full[0].copy()
    while len(chosen) < n_select:
        chosen.append(int(np.argmax(min_dist)))
        min_dist = np.minimum(min_dist, full[chosen[-1]])
    return chosen


@pytest.mark.parametrize("chunk_size", [None, 13, 64, 1000])
def test_same_selection_as_the_straightforward_loop(chunk_size: int | None) -> None:
    generator = torch.Generator().manual_seed(3)
    projected = (torch.randn(700, 37, generator=generator) * 3).half()
    assert _greedy_select(projected, 120, chunk_size=chunk_size).tolist() == straightforward_greedy(projected, 120)


def test_ties_go_to_the_first_row_like_the_exact_reference() -> None:
    # Small integer coordinates: every distance is exact in float16/float32, and duplicates and equal distances
    # abound, so the tie rule decides most steps.
    rng = np.random.default_rng(0)
    points = rng.integers(-3, 4, size=(400, 5)).astype(np.float32)
    points[100:150] = points[0]  # duplicates of the start row
    reference = exact_greedy(points, 200)
    assert len(set(reference[:150])) == 150  # the test really covers many distinct steps
    assert greedy_coreset(torch.from_numpy(points), 200).tolist() == reference
    assert greedy_coreset(torch.from_numpy(points), 200, chunk_size=3).tolist() == reference


def test_projected_bank_matches_the_straightforward_loop_with_row_chunks() -> None:
    features = torch.randn(900, 300, generator=torch.Generator().manual_seed(4))
    dim = jl_min_dim(900, 0.9)
    projected = (features @ sparse_projection(300, dim, seed=2)).half()
    pieces = [features[:250], features[250:251].numpy(), features[251:]]
    assert greedy_coreset(pieces, 90, seed=2).tolist() == straightforward_greedy(projected, 90)


def test_runs_on_a_requested_torch_device() -> None:
    points = torch.randn(200, 6, generator=torch.Generator().manual_seed(5))
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    results = [greedy_coreset(points, 30, device=device).tolist() for device in devices]
    assert all(result == results[0] for result in results)
    assert results[0] == straightforward_greedy(points.half(), 30)
