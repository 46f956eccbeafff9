"""Torch FPS and kNN on any device: the same indices as the NumPy FPS and the brute-force kNN."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmiad.features.grouping import (
    farthest_point_sample,
    farthest_point_sample_torch,
    group_points,
    knn_indices,
)
from mmiad.utils.compute import available_devices

DEVICES = available_devices()


def clouds() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    lattice = np.stack(np.meshgrid(*(np.arange(n) for n in (9, 7, 4)), indexing="ij"), -1).reshape(-1, 3)
    return [
        rng.normal(size=(3000, 3)).astype(np.float32) * 0.05 + 0.5,  # scanner-like scale and offset
        rng.uniform(-1, 1, size=(777, 3)).astype(np.float32),
        lattice.astype(np.float32) * 0.01,  # many exact ties
        np.repeat(rng.normal(size=(50, 3)).astype(np.float32), 4, axis=0),  # duplicates, exhausted at the end
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_torch_fps_equals_the_numpy_path(device: str) -> None:
    for cloud in clouds():
        count = min(400, len(cloud))
        expected = farthest_point_sample(cloud, count, backend="numpy")
        got = farthest_point_sample_torch(torch.from_numpy(cloud).to(device), count)
        assert got.device.type == device
        assert got.cpu().numpy().tolist() == expected.tolist()


def test_torch_fps_rejects_bad_counts() -> None:
    with pytest.raises(ValueError):
        farthest_point_sample_torch(torch.zeros(5, 3), 6)


def brute_knn(points: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Float64 distances, ordered by (distance, index)."""
    dist = ((queries[:, None, :].astype(np.float64) - points[None, :, :]) ** 2).sum(-1)
    return np.argsort(dist, axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["auto", "brute", "kdtree"])
def test_knn_on_a_device_equals_brute_force(device: str, backend: str) -> None:
    rng = np.random.default_rng(8)
    lattice = np.stack(np.meshgrid(*(np.arange(n) for n in (6, 5, 4)), indexing="ij"), -1).reshape(-1, 3)
    for points in (rng.normal(size=(2500, 3)).astype(np.float32), lattice.astype(np.float32)):
        queries = points[:: max(1, len(points) // 90)] + np.float32(0.0)
        idx, dist = knn_indices(
            torch.from_numpy(points).to(device), torch.from_numpy(queries).to(device), 9, backend=backend
        )
        assert idx.device.type == device and dist.device.type == device
        assert idx.cpu().numpy().tolist() == brute_knn(points, queries, 9).tolist()
        gathered = ((points[idx.cpu().numpy()] - queries[:, None, :]) ** 2).sum(-1)
        np.testing.assert_allclose(dist.cpu().numpy(), gathered, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_group_points_on_a_device_equals_the_cpu_grouping(device: str) -> None:
    points = torch.from_numpy(np.random.default_rng(9).normal(size=(1500, 3)).astype(np.float32))
    cpu_groups, cpu_centres = group_points(points, 64, 32)
    torch_groups, torch_centres = group_points(points.to(device), 64, 32, fps_backend="torch")
    assert torch.equal(torch_centres.cpu(), cpu_centres)
    assert torch.equal(torch_groups.cpu(), cpu_groups)
