"""Point-MAE's FPS start: the first point (CFM's CUDA kernel, the default) or a random point (CMDR-IAD's code)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmiad.features.grouping import farthest_point_sample
from mmiad.features.pointmae import PointMaeEncoder, PointMaeExtractor, PointMaePreset

SMALL = PointMaePreset("small", num_group=6, group_size=4, keep_blocks=12, layers=(3, 7, 11))


def extractor(**options: object) -> PointMaeExtractor:
    torch.manual_seed(0)
    model = PointMaeEncoder(12, (3, 7, 11), dim=16, num_heads=2)
    return PointMaeExtractor(model, SMALL, "random-0", **options)  # type: ignore[arg-type]


def fps_from(points: np.ndarray, start: int, count: int) -> list[int]:
    """Brute-force FPS from ``start`` (float64; the test clouds have no ties)."""
    chosen = [start]
    nearest = np.full(len(points), np.inf)
    for _ in range(count - 1):
        nearest = np.minimum(nearest, ((points - points[chosen[-1]]) ** 2).sum(1))
        chosen.append(int(np.argmax(nearest)))
    return chosen


def test_default_starts_at_the_first_point_and_keeps_the_config() -> None:
    default = extractor()
    points = torch.from_numpy(np.random.default_rng(0).normal(size=(40, 3)).astype(np.float32))
    centres, _ = default._group(points, points, None)
    assert centres[0] == 0
    assert centres.tolist() == farthest_point_sample(points.numpy(), 6).tolist()
    assert "fps_start" not in default.config()  # existing caches and model files keep their keys


def test_random_start_is_fps_from_a_seeded_random_point() -> None:
    rng = np.random.default_rng(1)
    points = torch.from_numpy(rng.normal(size=(40, 3)).astype(np.float32))
    random = extractor(fps_start="random", fps_seed=3)
    centres, members = random._group(points, points, None)
    start = int(centres[0])
    assert centres.tolist() == fps_from(points.double().numpy(), start, 6)
    # Members are the 4 nearest points of each centre, in the original indexing.
    for centre, group in zip(centres.tolist(), members.tolist(), strict=True):
        distances = ((points - points[centre]) ** 2).sum(1)
        assert sorted(group) == sorted(torch.argsort(distances)[:4].tolist())
    # The same cloud draws the same start; another seed (almost surely) another one.
    assert random._group(points, points, None)[0].tolist() == centres.tolist()
    starts = {int(extractor(fps_start="random", fps_seed=s)._group(points, points, None)[0][0]) for s in range(6)}
    assert len(starts) > 1
    assert random.config()["fps_start"] == "random" and random.config()["fps_seed"] == 3


def test_unknown_start_is_refused() -> None:
    with pytest.raises(ValueError, match="fps_start"):
        extractor(fps_start="middle")
