"""Extractors and projections on every device present: the CPU reference, and low precision within a stated bound.

On the CPU, moving an extractor must change nothing (identical features). On CUDA the same code runs with other
kernels, so features agree with the CPU to :data:`CUDA_TOLERANCE` (cuDNN's default TF32 convolutions round to
about 1e-3), while the Point-MAE groups and interpolation weights, being index computations, stay identical.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from tiny_clouds import cloud

from mmiad.features.base import DeviceExtractor, PointFeatures, extractor_device, place_extractor
from mmiad.features.fpfh import FPFHExtractor
from mmiad.features.pointmae import PointMaeExtractor
from mmiad.features.texture import TextureExtractor
from mmiad.features.vit import VitExtractor
from mmiad.features.wideresnet import WideResNet50Trunk, WideResNetExtractor
from mmiad.utils.compute import autocast

Vit = Callable[..., VitExtractor]
PointMae = Callable[..., PointMaeExtractor]

#: Largest |device − CPU| relative to the largest |CPU| feature accepted on CUDA.
CUDA_TOLERANCE = 1e-2
#: Largest |low − fp32| relative to the largest |fp32| feature: bf16 keeps 8 significant bits (measured on these
#: tiny random-init models: ViT ≤ 0.6 %, Point-MAE ≤ 1.9 %; full-size ViT-B/8 0.55 %, Point-MAE 2.8 %), fp16 11
#: bits (measured ≤ 0.25 %).
LOW_PRECISION_TOLERANCE = {"bf16": 3e-2, "fp16": 5e-3}


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """max |got − expected| / max |expected|, on the CPU in float32."""
    got, expected = got.detach().cpu().float(), expected.detach().cpu().float()
    return float((got - expected).abs().max() / expected.abs().max())


def assert_matches_cpu(got: torch.Tensor, expected: torch.Tensor, device: str) -> None:
    """Identical on the CPU; within :data:`CUDA_TOLERANCE` elsewhere."""
    assert got.device.type == torch.device(device).type
    if torch.device(device).type == "cpu":
        assert torch.equal(got, expected)
    else:
        assert got.shape == expected.shape and relative_error(got, expected) <= CUDA_TOLERANCE


def rgb_batch(count: int = 3, side: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, side, side, generator=torch.Generator().manual_seed(seed))


def test_extractors_say_whether_they_move(tiny_vit: Vit, tiny_pointmae: PointMae) -> None:
    movable = (tiny_vit(), tiny_pointmae(), TextureExtractor(), WideResNetExtractor(WideResNet50Trunk(), "random"))
    assert all(isinstance(extractor, DeviceExtractor) for extractor in movable)
    assert all(extractor_device(extractor).type == "cpu" for extractor in movable)
    fpfh = FPFHExtractor()  # NumPy by design: stays on the CPU whatever the pipeline's device
    assert not isinstance(fpfh, DeviceExtractor)
    assert place_extractor(fpfh, torch.device("meta")).type == "cpu"


def test_vit_on_a_device_equals_the_cpu(compute_device: str, tiny_vit: Vit) -> None:
    rgb = rgb_batch()
    expected = tiny_vit().extract(rgb)
    extractor = tiny_vit().to(compute_device)
    assert extractor.device.type == torch.device(compute_device).type
    assert_matches_cpu(extractor.extract(rgb), expected, compute_device)  # a CPU batch is moved in
    layers = extractor.extract_layers(rgb.to(compute_device), (0, 2))
    assert_matches_cpu(layers[1], expected, compute_device)


def test_texture_on_a_device_equals_the_cpu(compute_device: str) -> None:
    rgb = rgb_batch(2, 48)
    expected = TextureExtractor().extract(rgb)
    warmed = TextureExtractor()
    warmed.extract(rgb)  # filter matrices cached on the CPU must follow the move
    assert_matches_cpu(warmed.to(compute_device).extract(rgb), expected, compute_device)
    assert_matches_cpu(TextureExtractor().to(compute_device).extract(rgb), expected, compute_device)


def test_wideresnet_on_a_device_equals_the_cpu(compute_device: str) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        trunk = WideResNet50Trunk()
    rgb = rgb_batch(1, 32)
    expected = WideResNetExtractor(trunk, "random-0").extract(rgb)
    moved = WideResNetExtractor(trunk, "random-0").to(compute_device)
    assert_matches_cpu(moved.extract(rgb), expected, compute_device)


def test_pointmae_on_a_device_equals_the_cpu(compute_device: str, tiny_pointmae: PointMae) -> None:
    xyz, valid = cloud()
    expected = tiny_pointmae().extract_groups(xyz, valid)
    got = tiny_pointmae().to(compute_device).extract_groups(xyz, valid)
    for name in ("centre_idx", "member_idx"):  # torch FPS + kNN on an accelerator: the same indices
        assert torch.equal(getattr(got, name).cpu(), getattr(expected, name))
    assert torch.equal(got.features.pixel_index.cpu(), expected.features.pixel_index)
    assert torch.equal(got.features.neighbors.cpu(), expected.features.neighbors)
    assert_matches_cpu(got.features.features, expected.features.features, compute_device)
    if compute_device == "cpu":
        assert torch.equal(got.features.weights, expected.features.weights)
    else:
        torch.testing.assert_close(got.features.weights.cpu(), expected.features.weights, rtol=1e-4, atol=1e-6)


def test_pointmae_torch_grouping_path_equals_the_default_on_the_cpu(tiny_pointmae: PointMae) -> None:
    """The FPS an accelerator runs (torch) gives the default path's features on the CPU, bit for bit."""
    xyz, valid = cloud(24, seed=3)
    expected = tiny_pointmae().extract(xyz, valid)
    got = tiny_pointmae(fps_backend="torch").extract(xyz, valid)
    for name in ("features", "pixel_index", "neighbors", "weights"):
        assert torch.equal(getattr(got, name), getattr(expected, name))


def point_features(seed: int = 0) -> PointFeatures:
    """Grouped features (8 rows for 20×20 pixels, so ``to_grid`` takes the sparse path) with random weights."""
    generator = torch.Generator().manual_seed(seed)
    size, rows = 20, 8
    pixel_index = torch.randperm(size * size, generator=generator)[:300].sort().values
    neighbors = torch.randint(0, rows, (300, 3), generator=generator)
    weights = torch.rand(300, 3, generator=generator)
    weights /= weights.sum(dim=1, keepdim=True)
    return PointFeatures(torch.randn(rows, 5, generator=generator), pixel_index, neighbors, weights, size)


@pytest.mark.parametrize("method", ["sparse", "dense"])
def test_projection_on_a_device_equals_the_cpu(compute_device: str, method: str) -> None:
    features = point_features()
    moved = features.to(compute_device)
    assert moved.device.type == torch.device(compute_device).type and features.device.type == "cpu"
    assert all(t.device == moved.device for t in (moved.pixel_index, moved.neighbors, moved.weights))
    expected = features.to_grid(7, method=method)
    # Independent reference: the official dense map, pooled 3×3 without padding, adaptive-averaged.
    reference = F.adaptive_avg_pool2d(F.avg_pool2d(features.dense()[None], 3, stride=1), 7)[0]
    torch.testing.assert_close(expected, reference, rtol=1e-5, atol=1e-6)
    assert_matches_cpu(moved.to_grid(7, method=method), expected, compute_device)
    assert_matches_cpu(moved.dense(), features.dense(), compute_device)
    assert_matches_cpu(moved.foreground(7), features.foreground(7), compute_device)
    assert features.to("cpu") is features


def test_low_precision_features_stay_within_the_stated_tolerance(tiny_vit: Vit, tiny_pointmae: PointMae) -> None:
    """bf16/fp16 autocast around the forwards: close to fp32, not equal (so autocast really applied), and the
    Point-MAE groups and interpolation weights untouched (geometry never runs in low precision)."""
    rgb = rgb_batch()
    xyz, valid = cloud(seed=1)
    vit, pointmae = tiny_vit(seed=2), tiny_pointmae(seed=2)
    image32, points32 = vit.extract(rgb), pointmae.extract(xyz, valid)
    for precision, tolerance in LOW_PRECISION_TOLERANCE.items():
        with pytest.warns(UserWarning) if precision == "fp16" else nullcontext(), autocast("cpu", precision):
            image, points = vit.extract(rgb), pointmae.extract(xyz, valid)
        assert 0 < relative_error(image, image32) <= tolerance, precision
        assert 0 < relative_error(points.features, points32.features) <= tolerance, precision
        assert torch.equal(points.neighbors, points32.neighbors) and torch.equal(points.weights, points32.weights)


def test_pointmae_first_layer_keeps_float32_under_autocast(tiny_pointmae: PointMae) -> None:
    """Centred groups are millimetres against biases of 0.1, and the first BatchNorm divides by their spread: the
    layer before it must not round in bf16. Without that safeguard the hidden activations were off by about 50 %
    (and the full-size model's features by 38 %); with it they stay within the bf16 tolerance."""
    encoder = tiny_pointmae().model.encoder
    groups = torch.randn(6, 8, 3, generator=torch.Generator().manual_seed(4)) * 1e-3
    stats = encoder._input_statistics(groups)
    with torch.no_grad():
        reference = encoder._hidden(groups, stats)
        with autocast("cpu", "bf16"):
            low = encoder._hidden(groups, stats)
    assert low.dtype == torch.bfloat16  # the layers after the norm do run in bf16
    assert relative_error(low, reference) <= LOW_PRECISION_TOLERANCE["bf16"]
