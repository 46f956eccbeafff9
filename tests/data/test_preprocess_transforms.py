"""Online transforms: square padding, resizing equivalences and mapping maps back to the original resolution."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmiad.data.preprocess.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PadGeometry,
    map_to_original,
    pad_to_square,
    prepare_input,
    resize_mask_nearest,
    resize_xyz_nearest,
    rgb_to_tensor,
    square_geometry,
)
from mmiad.data.sample import Sample


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((60, 80), PadGeometry((60, 80), 100, (20, 10))),
        ((250, 130), PadGeometry((250, 130), 300, (25, 85))),
        ((800, 800), PadGeometry((800, 800), 800, (0, 0))),
        ((401, 400), PadGeometry((401, 400), 500, (49, 50))),
    ],
)
def test_square_geometry(size: tuple[int, int], expected: PadGeometry) -> None:
    assert square_geometry(*size) == expected


def test_pad_to_square_modes() -> None:
    image = np.arange(60 * 80 * 3, dtype=np.int64).reshape(60, 80, 3)
    zeros, geometry = pad_to_square(image, mode="constant")
    edge, _ = pad_to_square(image, mode="edge")
    assert zeros.shape == edge.shape == (100, 100, 3)
    np.testing.assert_array_equal(zeros[20:80, 10:90], image)
    assert zeros[:20].sum() == 0 and zeros[80:].sum() == 0 and zeros[:, :10].sum() == 0 and zeros[:, 90:].sum() == 0
    np.testing.assert_array_equal(edge[0, 10:90], image[0])  # top rows repeat the first row
    np.testing.assert_array_equal(edge[99, 0], image[-1, 0])  # bottom-left corner repeats the corner pixel
    assert geometry.pad == (20, 10)
    with pytest.raises(ValueError, match="pad mode"):
        pad_to_square(image, mode="reflect")


@pytest.mark.parametrize(
    ("in_size", "out_size"),
    [((800, 800), (224, 224)), ((300, 300), (224, 224)), ((100, 100), (224, 224)), ((112, 77), (224, 224)),
     ((7, 5), (14, 10)), ((224, 224), (224, 224)), ((13, 29), (56, 3)), ((1000, 900), (224, 224))],
)  # fmt: skip
def test_resize_xyz_nearest_equals_torch_legacy_nearest(in_size: tuple[int, int], out_size: tuple[int, int]) -> None:
    xyz = np.random.default_rng(0).normal(size=(*in_size, 3)).astype(np.float32)
    expected = F.interpolate(torch.from_numpy(xyz).permute(2, 0, 1)[None], size=out_size, mode="nearest")
    np.testing.assert_array_equal(resize_xyz_nearest(xyz, out_size), expected[0].permute(1, 2, 0).numpy())


def test_rgb_to_tensor_normalises_with_imagenet_statistics() -> None:
    rgb = np.empty((50, 70, 3), dtype=np.uint8)
    rgb[...] = (255, 128, 0)
    tensor = rgb_to_tensor(rgb, 32)
    assert tensor.shape == (3, 32, 32) and tensor.dtype == torch.float32
    for channel, value in enumerate((255, 128, 0)):
        expected = (value / 255 - IMAGENET_MEAN[channel]) / IMAGENET_STD[channel]
        torch.testing.assert_close(tensor[channel], torch.full((32, 32), expected), atol=1e-5, rtol=0)


def test_resize_mask_nearest_keeps_a_binary_mask() -> None:
    mask = np.zeros((100, 100), dtype=bool)
    mask[50:, :] = True
    resized = resize_mask_nearest(mask, 10)
    np.testing.assert_array_equal(resized, np.repeat([[False], [True]], 5, axis=0).repeat(10, axis=1))


def _sample() -> Sample:
    rng = np.random.default_rng(0)
    xyz = rng.uniform(0.1, 1.0, (60, 80, 3)).astype(np.float32)
    valid = np.ones((60, 80), dtype=bool)
    valid[:, :20] = False  # left quarter invalid; its stale coordinates must not leak into the input
    gt = np.zeros((60, 80), dtype=bool)
    gt[30:50, 40:70] = True
    rgb = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    return Sample(rgb, xyz, valid, gt, 1, "widget", "crack")


def test_prepare_input_pads_and_resizes_every_modality() -> None:
    sample = _sample()
    model_input = prepare_input(sample, size=56)
    assert model_input.rgb.shape == (3, 56, 56)
    assert model_input.xyz.shape == (56, 56, 3) and model_input.xyz.dtype == np.float32
    assert (model_input.original_size, model_input.padded_size, model_input.pad) == ((60, 80), 100, (20, 10))
    assert model_input.label == 1
    # Independent expectation: zero the invalid points, pad with zeros, pick the floor-indexed pixels.
    canvas = np.zeros((100, 100, 3), dtype=np.float32)
    canvas[20:80, 10:90] = np.where(sample.valid[..., None], sample.xyz, 0)
    index = np.floor(np.arange(56) * (100 / 56)).astype(int)
    np.testing.assert_array_equal(model_input.xyz, canvas[index][:, index])
    np.testing.assert_array_equal(model_input.valid, np.any(canvas[index][:, index] != 0, axis=-1))
    gt_canvas = np.zeros((100, 100), dtype=bool)
    gt_canvas[20:80, 10:90] = sample.gt_mask
    np.testing.assert_array_equal(model_input.gt_mask, resize_mask_nearest(gt_canvas, 56))


def test_prepare_input_rgb_padding_mode() -> None:
    sample = _sample()
    black = prepare_input(sample, size=100, rgb_pad_mode="constant").rgb
    edge = prepare_input(sample, size=100, rgb_pad_mode="edge").rgb
    zero_level = torch.tensor([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)])
    torch.testing.assert_close(black[:, 0, 0], zero_level)  # padded corner is black in M3DM mode
    assert not torch.allclose(edge[:, 0, 0], zero_level)


def test_map_to_original_recovers_the_gt_region_of_a_non_square_sample() -> None:
    sample = _sample()
    model_input = prepare_input(sample, size=224)
    restored = map_to_original(model_input.gt_mask.astype(np.float32), model_input)
    assert restored.shape == (60, 80)
    predicted = restored > 0.5
    iou = (predicted & sample.gt_mask).sum() / (predicted | sample.gt_mask).sum()
    assert iou > 0.95
    constant = map_to_original(np.full((224, 224), 3.0, dtype=np.float32), model_input.geometry)
    np.testing.assert_allclose(constant, 3.0)
