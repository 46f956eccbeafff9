"""RAD's retrieval levels and map/score rules against loop-by-loop float64 references (the official formulas)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmiad.methods.rad.retrieval import (
    finalize,
    gaussian_kernel2d,
    global_similarity,
    layer_weights,
    normalised,
    retrieve_images,
    top_count,
    window_similarity,
)


def unit(*shape: int, seed: int) -> torch.Tensor:
    return normalised(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))


def window_reference(query: np.ndarray, refs: np.ndarray, grid: tuple[int, int], radius: int, valid=None) -> np.ndarray:
    """The official loop: per position, the clipped window's candidates of every retrieved image, max cosine."""
    rows, cols = grid
    best = np.full(rows * cols, -2.0)
    for r in range(rows):
        for c in range(cols):
            candidates = []
            for rr in range(max(0, r - radius), min(rows - 1, r + radius) + 1):
                for cc in range(max(0, c - radius), min(cols - 1, c + radius) + 1):
                    for image in range(refs.shape[0]):
                        if valid is None or valid[image, rr * cols + cc]:
                            candidates.append(float(refs[image, rr * cols + cc] @ query[r * cols + c]))
            if candidates:
                best[r * cols + c] = max(candidates)
    return best


@pytest.mark.parametrize(("grid", "radius"), [((5, 4), 0), ((5, 4), 1), ((4, 6), 2), ((3, 3), 5)])
def test_window_matches_the_loop_with_border_clipping(grid: tuple[int, int], radius: int) -> None:
    positions = grid[0] * grid[1]
    query, refs = unit(positions, 6, seed=1), unit(3, positions, 6, seed=2)
    expected = window_reference(query.numpy(), refs.numpy(), grid, radius)
    np.testing.assert_allclose(window_similarity(query, refs, grid, radius).numpy(), expected, atol=1e-12)
    few_per_pass = window_similarity(query, refs, grid, radius, offsets_per_pass=2)  # several passes
    np.testing.assert_allclose(few_per_pass.numpy(), expected, atol=1e-12)


def test_window_is_clipped_not_padded() -> None:
    """Every real cosine is negative: zero-padded cells would lift the border to 0, clipped windows keep it."""
    grid = (4, 4)
    query = normalised(unit(16, 5, seed=3).abs())
    refs = normalised(-torch.ones(2, 16, 5, dtype=torch.float64))
    got = window_similarity(query, refs, grid, 1)
    np.testing.assert_allclose(got.numpy(), -query.sum(dim=1).numpy() / np.sqrt(5), atol=1e-12)
    assert (got < 0).all()


def test_window_sees_only_its_neighbourhood() -> None:
    """A perfect match one cell away counts for ρ=1, one two cells away does not (corner window is 2×2)."""
    grid, channels = (4, 4), 4
    query = torch.zeros(16, channels, dtype=torch.float64)
    query[0, 0] = 1.0
    near, far = torch.zeros(1, 16, channels, dtype=torch.float64), torch.zeros(1, 16, channels, dtype=torch.float64)
    near[0, 1 * 4 + 1, 0] = 1.0
    far[0, 2 * 4 + 2, 0] = 1.0
    assert window_similarity(query, near, grid, 1)[0] == 1.0
    assert window_similarity(query, far, grid, 1)[0] == 0.0
    assert window_similarity(query, far, grid, 2)[0] == 1.0


def test_window_respects_the_valid_cells() -> None:
    grid, positions = (4, 5), 20
    query, refs = unit(positions, 3, seed=4), unit(2, positions, 3, seed=5)
    valid = torch.rand(2, positions, generator=torch.Generator().manual_seed(6)) > 0.5
    got = window_similarity(query, refs, grid, 1, valid)
    expected = window_reference(query.numpy(), refs.numpy(), grid, 1, valid.numpy())
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-12)


def test_global_mode_is_the_max_over_every_patch_and_equals_a_covering_window() -> None:
    grid, positions = (3, 4), 12
    query, refs = unit(positions, 5, seed=7), unit(4, positions, 5, seed=8)
    expected = (query.numpy() @ refs.numpy().reshape(-1, 5).T).max(axis=1)
    np.testing.assert_allclose(global_similarity(query, refs, chunk=5).numpy(), expected, atol=1e-12)
    np.testing.assert_allclose(window_similarity(query, refs, grid, 27).numpy(), expected, atol=1e-12)


def test_retrieval_is_the_top_cosine_clamped_and_order_free() -> None:
    bank = torch.randn(7, 8, generator=torch.Generator().manual_seed(9), dtype=torch.float64) * 3
    query = torch.randn(8, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    cosine = (bank.numpy() @ query.numpy()) / (np.linalg.norm(bank.numpy(), axis=1) * np.linalg.norm(query.numpy()))
    assert retrieve_images(query, bank, 3).tolist() == np.argsort(-cosine)[:3].tolist()
    assert sorted(retrieve_images(query, bank, 150).tolist()) == list(range(7))  # k beyond the memory: clamped
    permutation = torch.randperm(7, generator=torch.Generator().manual_seed(11))
    moved = retrieve_images(query, bank[permutation], 3)
    assert permutation[moved].tolist() == np.argsort(-cosine)[:3].tolist()


def bilinear_reference(grid_map: np.ndarray, size: int) -> np.ndarray:
    """torch's bilinear resize with align_corners=False, in float64."""

    def axis(n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        source = np.maximum((np.arange(size) + 0.5) * n_in / size - 0.5, 0.0)
        low = np.floor(source).astype(int)
        return low, np.minimum(low + 1, n_in - 1), source - low

    r0, r1, wr = axis(grid_map.shape[0])
    c0, c1, wc = axis(grid_map.shape[1])
    top = grid_map[r0][:, c0] * (1 - wc) + grid_map[r0][:, c1] * wc
    bottom = grid_map[r1][:, c0] * (1 - wc) + grid_map[r1][:, c1] * wc
    return top * (1 - wr)[:, None] + bottom * wr[:, None]


def finalize_reference(patches: np.ndarray, grid: tuple[int, int], size: int, ratio: float) -> tuple[np.ndarray, float]:
    """RAD's rule: bilinear to ``size``, 5×5 σ=1 Gaussian with zero padding, mean of the top int(ratio·size²)."""
    up = bilinear_reference(patches.reshape(grid), size)
    taps = np.exp(-((np.arange(5) - 2.0) ** 2) / 2.0)
    kernel = np.outer(taps, taps) / np.outer(taps, taps).sum()
    padded = np.pad(up, 2)
    blurred = np.zeros_like(up)
    for dr in range(5):
        for dc in range(5):
            blurred += kernel[dr, dc] * padded[dr : dr + size, dc : dc + size]
    top = int(ratio * size * size)
    score = float(np.sort(blurred.ravel())[::-1][:top].mean()) if top else float(blurred.max())
    return blurred, score


@pytest.mark.parametrize("ratio", [0.01, 0.05, 0.0])
def test_map_and_score_follow_the_official_formula(ratio: float) -> None:
    grid = (7, 7)
    patches = torch.rand(49, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    anomaly_map, score = finalize(patches, grid, map_size=64, out_size=64, max_ratio=ratio)
    expected_map, expected_score = finalize_reference(patches.numpy(), grid, 64, ratio)
    np.testing.assert_allclose(anomaly_map.numpy(), expected_map, atol=1e-6)
    assert score == pytest.approx(expected_score, abs=1e-6)


def test_a_constant_map_scores_its_constant_and_655_pixels_are_averaged() -> None:
    _, score = finalize(torch.full((784,), 0.3), (28, 28), map_size=256, out_size=224)
    assert score == pytest.approx(0.3, abs=1e-6)  # the interior is untouched by the zero-padded blur
    assert top_count(0.01, 256) == 655


def test_gaussian_kernel_and_layer_weights() -> None:
    kernel = gaussian_kernel2d(5, 1.0).numpy()
    taps = np.exp(-((np.arange(5) - 2.0) ** 2) / 2.0)
    np.testing.assert_allclose(kernel, np.outer(taps, taps) / np.outer(taps, taps).sum(), atol=1e-15)
    assert layer_weights(4, None) == [0.25] * 4
    assert layer_weights(2, [1.0, 3.0]) == [0.25, 0.75]
    with pytest.raises(ValueError, match="layer weights"):
        layer_weights(4, [1.0, 1.0])
