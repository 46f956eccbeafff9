"""Pictures and clouds: exact inverse of the input transform, bounded sizes, decodable clouds."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from mmiad.data.preprocess import IMAGENET_MEAN, IMAGENET_STD
from mmiad.report import images


def test_unnormalize_inverts_the_imagenet_transform() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    normalised = (rgb.astype(np.float32) / 255 - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(
        IMAGENET_STD, np.float32
    )
    back = images.unnormalize_rgb(normalised.transpose(2, 0, 1))
    np.testing.assert_array_equal(back, rgb)
    with pytest.raises(ValueError, match="normalised image"):
        images.unnormalize_rgb(np.zeros((4, 4)))


def test_depth_image_stretches_valid_points_and_blacks_out_invalid() -> None:
    xyz = np.zeros((2, 2, 3), np.float32)
    xyz[0, 0] = (1, 1, 2.0)
    xyz[0, 1] = (1, 1, 3.0)
    grey = images.depth_image(xyz)
    assert grey[1, 0] == 0 and grey[1, 1] == 0
    # Percentiles of two values: 2.01 and 2.99, so the ends clip to 1 and 255.
    assert (grey[0, 0], grey[0, 1]) == (1, 255)


def test_thumbnail_bounds_the_longest_side_and_png_decodes() -> None:
    image = np.zeros((300, 150, 3), np.uint8)
    small = images.thumbnail(image, 100)
    assert small.shape == (100, 50, 3)
    assert images.thumbnail(image, 400) is image
    uri = images.png_data_uri(small)
    assert uri.startswith("data:image/png;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert decoded.size == (50, 100)


def test_cloud_keeps_valid_points_subsampled_and_decodes() -> None:
    rng = np.random.default_rng(1)
    xyz = rng.uniform(-1, 1, (50, 50, 3)).astype(np.float32)
    xyz[:10] = 0  # 500 invalid points
    scores = np.full((50, 50), 0.5, np.float32)
    scores[40:] = 10.0  # above the scale: full ramp
    cloud = images.make_cloud(xyz, scores, None, scale=1.0, max_points=300)
    assert cloud is not None and cloud.count == 300
    q = np.frombuffer(base64.b64decode(cloud.positions), "<u2").reshape(-1, 3)
    colors = np.frombuffer(base64.b64decode(cloud.colors), np.uint8)
    assert q.shape == (300, 3) and colors.shape == (300,)
    points = np.asarray(cloud.low) + q / 65535 * (np.asarray(cloud.high) - np.asarray(cloud.low))
    valid = xyz[10:].reshape(-1, 3)
    # Every decoded point is one of the valid input points, to the quantisation step.
    nearest = np.abs(points[:, None, :] - valid[None]).max(axis=2).min(axis=1)
    assert nearest.max() < 2 / 65535 * 2
    assert set(np.unique(colors)) <= {128, 255}
    assert images.make_cloud(np.zeros((4, 4, 3)), np.zeros((4, 4)), None, 1.0) is None
    with pytest.raises(ValueError, match="differ in size"):
        images.make_cloud(xyz, np.zeros((3, 3)), None, 1.0)


def test_ramp_matches_the_overlay_colours() -> None:
    ramp = images.ramp_colors()
    assert len(ramp) == 256 and ramp[0] == [0, 0, 128] and ramp[-1] == [200, 0, 0]
