"""MuSc-V2 mutual scoring, CAE and RsCon against loop-by-loop references written from the official definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmiad.methods.musc.cae import cae_scores, patch_members
from mmiad.methods.musc.msm import (
    BatchTooSmallError,
    MixedSizeError,
    checked_subsets,
    minimum_batch,
    mutual_scores,
    split_subsets,
    stack_tokens,
)
from mmiad.methods.musc.rscon import rescore


def _brute_msm(tokens: list[np.ndarray], interval: float) -> list[np.ndarray]:
    """Official MSM_single by loops: nearest token of every other sample, mean of the int(R·X) smallest."""
    scores = []
    for i, query in enumerate(tokens):
        row = []
        for patch in query:
            per_ref = []
            for j, ref in enumerate(tokens):
                if j == i:
                    continue
                per_ref.append(min(math.dist(patch, other) for other in ref))
            keep = int(len(per_ref) * interval)
            row.append(sum(sorted(per_ref)[:keep]) / keep)
        scores.append(np.array(row))
    return scores


def _random_tokens(seed: int, count: int, lengths: list[int], channels: int = 3) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(lengths[i % len(lengths)], channels, generator=generator) for i in range(count)]


def test_minimum_batch_follows_the_interval() -> None:
    assert minimum_batch(0.3) == 5  # int(3·0.3) = 0, int(4·0.3) = 1
    assert minimum_batch(0.5) == 3
    assert minimum_batch(0.1) == 11


@pytest.mark.parametrize("interval", [0.3, 0.5])
def test_mutual_scores_match_brute_force_with_ragged_samples(interval: float) -> None:
    tokens = _random_tokens(0, 7, [4, 6, 3])
    stacked, valid = stack_tokens(tokens, "3D")
    result = mutual_scores(stacked, valid, interval=interval, chunk_size=2)
    expected = _brute_msm([t.numpy().astype(np.float64) for t in tokens], interval)
    for i, reference in enumerate(expected):
        np.testing.assert_allclose(result[i, : len(reference)].numpy(), reference, rtol=1e-5, atol=1e-6)
        assert (result[i, len(reference) :] == 0).all()


def test_mutual_scores_do_not_depend_on_chunking_or_sample_order() -> None:
    stacked, valid = stack_tokens(_random_tokens(1, 9, [5]), "2D")
    whole = mutual_scores(stacked, valid, chunk_size=100)
    for chunk in (1, 3, 8):
        torch.testing.assert_close(mutual_scores(stacked, valid, chunk_size=chunk), whole, rtol=1e-5, atol=1e-6)
    order = torch.randperm(9, generator=torch.Generator().manual_seed(3))
    permuted = mutual_scores(stacked[order], valid[order], chunk_size=4)
    torch.testing.assert_close(permuted, whole[order], rtol=1e-5, atol=1e-6)


def test_too_small_batches_and_mixed_channels_are_clear_errors() -> None:
    stacked, valid = stack_tokens(_random_tokens(2, 4, [3]), "2D")
    with pytest.raises(BatchTooSmallError, match="at least 5 samples"):
        mutual_scores(stacked, valid)
    with pytest.raises(MixedSizeError, match="channel counts"):
        stack_tokens([torch.zeros(3, 4), torch.zeros(3, 5)], "2D")
    with pytest.raises(BatchTooSmallError, match="per subset"):
        checked_subsets(12, 3, seed=0, interval=0.3)  # subsets of 4


def test_subsets_are_a_seeded_partition() -> None:
    first = split_subsets(23, 3, seed=7)
    again = split_subsets(23, 3, seed=7)
    other = split_subsets(23, 3, seed=8)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))
    assert sorted(np.concatenate(first).tolist()) == list(range(23))
    assert sorted(len(s) for s in first) == [7, 8, 8]
    assert [s.tolist() for s in split_subsets(5, 1, seed=1)] == [[0, 1, 2, 3, 4]]


def _rank_match_loops(source: list[float], target: list[float]) -> list[float]:
    """replace_sorted by loops: the k-th smallest target gets the k-th smallest source; equal targets share the
    mean of the source values over their ranks."""
    ordered_source = sorted(source)
    out = [0.0] * len(target)
    for j, value in enumerate(target):
        below = sum(1 for v in target if v < value)
        tied = sum(1 for v in target if v == value)
        out[j] = sum(ordered_source[below : below + tied]) / tied
    return out


def _std(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _brute_enhance(own: list[list[float]], carried: list[list[float]], rows_with_evidence: list[bool] | None):
    """One modality's CAE step by loops (official compute_scores_multiple)."""
    count, refs = len(own), len(own[0])
    confidence = [1 - v for v in _rank_match_loops([_std(r) for r in own], [_std(r) for r in carried])]
    rescaled = [row[:] for row in carried]
    rows = [i for i in range(count) if rows_with_evidence is None or rows_with_evidence[i]]
    if rows:
        flat = _rank_match_loops(
            [own[i][r] for i in rows for r in range(refs)], [carried[i][r] for i in rows for r in range(refs)]
        )
        for position, i in enumerate(rows):
            rescaled[i] = flat[position * refs : (position + 1) * refs]
    boosted = [[max(own[i][r], rescaled[i][r]) * confidence[i] for r in range(refs)] for i in range(count)]
    flat = _rank_match_loops([v for row in own for v in row], [v for row in boosted for v in row])
    return [[(own[i][r] + flat[i * refs + r]) / 2 for r in range(refs)] for i in range(count)]


def _brute_cae(tokens_2d, tokens_3d, patch_of_centre, interval):
    """Official MSM_multiple by loops, for one layer."""
    out_2d, out_3d = [], []
    for i in range(len(tokens_2d)):
        refs = [j for j in range(len(tokens_2d)) if j != i]
        d2 = [[min(math.dist(p, q) for q in tokens_2d[j]) for j in refs] for p in tokens_2d[i]]
        d3 = [[min(math.dist(p, q) for q in tokens_3d[j]) for j in refs] for p in tokens_3d[i]]
        d2x = []
        for patch in range(len(tokens_2d[i])):
            inside = [g for g in range(len(tokens_3d[i])) if patch_of_centre[i][g] == patch]
            d2x.append([sum(d3[g][r] for g in inside) / len(inside) if inside else 0.0 for r in range(len(refs))])
        d3x = [d2[patch_of_centre[i][g]][:] for g in range(len(tokens_3d[i]))]
        evidence = [sum(row) != 0 for row in d2x]
        e2 = _brute_enhance(d2, d2x, evidence)
        e3 = _brute_enhance(d3, d3x, None)
        keep = max(1, int(len(refs) * interval))
        out_2d.append([sum(sorted(row)[:keep]) / keep for row in e2])
        out_3d.append([sum(sorted(row)[:keep]) / keep for row in e3])
    return out_2d, out_3d


def test_cae_matches_the_official_steps_by_loops() -> None:
    generator = torch.Generator().manual_seed(5)
    count, grid, size = 6, (2, 2), 8  # 4 patches of 4×4 pixels on an 8×8 input
    tokens_2d = [torch.randn(4, 3, generator=generator) for _ in range(count)]
    tokens_3d = [torch.randn(3 + i % 2, 2, generator=generator) for i in range(count)]
    # Centres on pixels; patch 3 (bottom right) receives no centre in any sample, so its CAE row stays 2D-only.
    pixels = [torch.tensor([0, 5, 33, 2][: len(t)]) for t in tokens_3d]
    patches = [patch_members(p, size, grid) for p in pixels]
    assert patches[1].tolist() == [0, 1, 2, 0]
    z2, v2 = stack_tokens(tokens_2d, "2D")
    z3, v3 = stack_tokens(tokens_3d, "3D")
    s2, s3 = cae_scores(z2, v2, z3, v3, patches, chunk_size=2)
    e2, e3 = _brute_cae(
        [t.double().tolist() for t in tokens_2d],
        [t.double().tolist() for t in tokens_3d],
        [p.tolist() for p in patches],
        0.3,
    )
    for i in range(count):
        np.testing.assert_allclose(s2[i].numpy(), e2[i], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(s3[i, : len(e3[i])].numpy(), e3[i], rtol=1e-5, atol=1e-6)


def test_rescore_matches_the_window_mask_operation_by_loops() -> None:
    generator = torch.Generator().manual_seed(9)
    scores = torch.rand(9, generator=generator, dtype=torch.float64)
    features = torch.randn(9, 4, generator=generator, dtype=torch.float64)
    result = rescore(scores, features, (1, 7))
    low, high = min(scores.tolist()), max(scores.tolist())
    normalised = [(s - low) / (high - low) for s in scores.tolist()]
    sims = (features @ features.T).tolist()
    expected = []
    for i in range(9):
        per_window = []
        for k in (1, 7):
            top = sorted(range(9), key=lambda j: -sims[i][j])[:k]
            per_window.append(sum(sims[i][j] * normalised[j] for j in top) / sum(sims[i][j] for j in top))
        expected.append(sum(per_window) / 2)
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-10)
    torch.testing.assert_close(rescore(scores, features, (0,)), scores)
    torch.testing.assert_close(rescore(scores, features, ()), scores)
