from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmiad.features import base, projection
from mmiad.features.base import PointFeatures, identity_point_features
from mmiad.features.projection import axis_pooling, project_to_grid


def dense_reference(features: PointFeatures, out_size: int) -> torch.Tensor:
    """The official order of operations: dense pixel map, 3×3 mean without padding, adaptive mean."""
    pooled = F.avg_pool2d(features.dense().unsqueeze(0), kernel_size=3, stride=1)
    return F.adaptive_avg_pool2d(pooled, out_size)[0]


def grouped_features(size: int, pixels: int, groups: int, channels: int, seed: int) -> PointFeatures:
    """Point-MAE-like: few feature rows, each pixel blending its 3 nearest group centres (in pixel space)."""
    generator = torch.Generator().manual_seed(seed)
    pixel_index = torch.randperm(size * size, generator=generator)[:pixels].sort().values
    coords = torch.stack([pixel_index // size, pixel_index % size], dim=1).float()
    centres = coords[torch.randperm(pixels, generator=generator)[:groups]]
    distance, neighbors = torch.cdist(coords, centres).topk(3, largest=False)
    weights = 1 / (distance**2 + 1e-3)
    weights = weights / weights.sum(dim=1, keepdim=True)
    return PointFeatures(torch.randn(groups, channels, generator=generator), pixel_index, neighbors, weights, size)


@pytest.mark.parametrize(("size", "out_size"), [(32, 32), (32, 8), (32, 7), (20, 24), (5, 1)])
def test_axis_operator_averages(size: int, out_size: int) -> None:
    index, weight = axis_pooling(size, out_size)
    operator = torch.zeros(out_size, size)
    for source in range(size):
        operator[index[source], source] += weight[source]
    torch.testing.assert_close(operator.sum(dim=1), torch.ones(out_size))  # every cell is a mean
    # A single bright input column shows exactly the pooled operator: compare with torch's own pooling.
    for source in (0, size // 2, size - 1):
        signal = torch.zeros(1, 1, size)
        signal[..., source] = 1.0
        expected = F.adaptive_avg_pool1d(F.avg_pool1d(signal, 3, 1), out_size)[0, 0]
        torch.testing.assert_close(operator[:, source], expected)


@pytest.mark.parametrize("out_size", [64, 16, 10, 3])
def test_sparse_projection_equals_the_dense_official_one(out_size: int) -> None:
    features = grouped_features(size=64, pixels=2500, groups=40, channels=24, seed=out_size)
    sparse = project_to_grid(
        features.features, features.pixel_index, features.neighbors, features.weights, 64, out_size
    )
    torch.testing.assert_close(sparse, dense_reference(features, out_size), atol=1e-6, rtol=1e-5)


def test_fine_grids_sum_by_sorting_with_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    features = grouped_features(size=48, pixels=1500, groups=30, channels=8, seed=1)
    args = (features.features, features.pixel_index, features.neighbors, features.weights, 48, 48)
    scratch = project_to_grid(*args)
    monkeypatch.setattr(projection, "SCRATCH_ENTRIES", 0)
    torch.testing.assert_close(project_to_grid(*args), scratch, atol=1e-6, rtol=1e-5)


def test_to_grid_goes_sparse_only_for_grouped_features(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(base, "project_to_grid", lambda *args: calls.append(args) or projection.project_to_grid(*args))
    grouped = grouped_features(size=32, pixels=600, groups=20, channels=4, seed=2)
    torch.testing.assert_close(grouped.to_grid(8), dense_reference(grouped, 8), atol=1e-6, rtol=1e-5)
    assert len(calls) == 1
    valid = np.zeros((32, 32), dtype=bool)
    valid[4:20, 6:30] = True
    per_pixel = identity_point_features(torch.randn(int(valid.sum()), 4), valid)  # FPFH-like: a row per pixel
    torch.testing.assert_close(per_pixel.to_grid(8), dense_reference(per_pixel, 8))
    assert len(calls) == 1


def test_projection_of_a_sample_without_valid_pixels_is_zero() -> None:
    empty = project_to_grid(
        torch.randn(4, 3),
        torch.zeros(0, dtype=torch.long),
        torch.zeros(0, 3, dtype=torch.long),
        torch.zeros(0, 3),
        16,
        4,
    )
    assert empty.shape == (3, 4, 4) and not empty.any()


def test_projection_method_can_be_forced() -> None:
    grouped = grouped_features(size=32, pixels=600, groups=20, channels=4, seed=3)
    dense, sparse = grouped.to_grid(8, method="dense"), grouped.to_grid(8, method="sparse")
    assert torch.equal(dense, dense_reference(grouped, 8))
    torch.testing.assert_close(sparse, dense, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="projection method"):
        grouped.to_grid(8, method="fast")
