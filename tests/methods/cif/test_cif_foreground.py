"""CIF's foreground rules against loop-by-loop and closed-form references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmiad.data.preprocess import ModelInput, prepare_input
from mmiad.data.sample import Sample
from mmiad.methods.cif.foreground import corner_plane_mask, fill_gaps, foreground_grid, resolve_rule, to_grid


def _fill_reference(depth: np.ndarray) -> np.ndarray:
    """One official gap-filling pass, pixel by pixel, reading only the image before the pass."""
    out = depth.copy()
    height, width = depth.shape
    for r in range(height):
        for c in range(width):
            if depth[r, c] != 0:
                continue
            values = [
                depth[rr, cc]
                for rr in range(r - 1, r + 2)
                for cc in range(c - 1, c + 2)
                if 0 <= rr < height and 0 <= cc < width and depth[rr, cc] > 0
            ]
            if values:
                out[r, c] = sum(values) / len(values)
    return out


def _tilted_scene(size: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """A tilted plane (metres) with a 2 cm bump in the middle; returns (depth, the bump's pixels)."""
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float64)
    depth = 0.6 + 0.002 * rows + 0.001 * cols
    bump = (np.abs(rows - size / 2) < 5) & (np.abs(cols - size / 2) < 6)
    depth[bump] -= 0.02
    return depth, bump


def test_fill_gaps_matches_the_pixel_loop() -> None:
    rng = np.random.default_rng(0)
    depth = rng.uniform(0.2, 0.9, (9, 11))
    depth[rng.random(depth.shape) < 0.4] = 0
    depth[0:3, 0:3] = 0  # a hole bigger than one pass fills
    np.testing.assert_allclose(fill_gaps(depth), _fill_reference(depth), rtol=0, atol=1e-15)


def test_corner_plane_finds_only_the_bump_and_never_a_missing_point() -> None:
    depth, bump = _tilted_scene()
    np.testing.assert_array_equal(corner_plane_mask(depth), bump)
    holed = depth.copy()
    holed[18:22, 18:22] = 0  # missing points inside the bump: the 3 fills close a 4×4 hole, so they count again
    holed[26:36, 3:11] = 0  # a large hole in the background: filled only at its rim, never foreground
    mask = corner_plane_mask(holed)
    assert not mask[26:36, 3:11].any()
    assert mask[18:22, 18:22].all()
    # Without fills a missing point is never foreground.
    assert not corner_plane_mask(holed, fills=0)[18:22, 18:22].any()


def test_corner_plane_normalises_out_of_range_depths() -> None:
    depth, bump = _tilted_scene()
    millimetres = depth * 1000  # > 1: min-max normalised first, as the official dataset class does
    low, high = millimetres.min(), millimetres.max()
    normalised = (millimetres - low) / (high - low)
    for _ in range(3):  # the minimum became 0, i.e. "missing": the official fills overwrite it
        normalised = _fill_reference(normalised)
    rows, cols = np.mgrid[0:40, 0:40] / 39.0
    normalised_corners = {
        (0, 0): (slice(0, 2), slice(0, 2)),
        (0, -1): (slice(0, 2), slice(-2, None)),
        (-1, 0): (slice(-2, None), slice(0, 2)),
        (-1, -1): (slice(-2, None), slice(-2, None)),
    }
    tl, tr, bl, br = (normalised[normalised_corners[key]].mean() for key in ((0, 0), (0, -1), (-1, 0), (-1, -1)))
    surface = (tl * (1 - rows) + bl * rows) * (1 - cols) + (tr * (1 - rows) + br * rows) * cols
    expected = (np.abs(surface - normalised) > 7e-3) & (normalised != 0)
    np.testing.assert_array_equal(corner_plane_mask(millimetres), expected)
    assert expected[bump].all()


def test_an_empty_corner_grows_its_window_until_it_holds_a_depth() -> None:
    """Officially a 2×2 corner without depth after the fills gives NaN, an empty mask and a crash; here the corner
    window grows until it holds a depth, and the surface uses that window's mean positive depth."""
    depth, bump = _tilted_scene()
    depth[-7:, -7:] = 0  # a dropout at the bottom-right corner, larger than 3 fills can close
    filled = depth.copy()
    for _ in range(3):
        filled = _fill_reference(filled)
    assert not (filled[-2:, -2:] > 0).any()
    side = next(s for s in range(2, 21) if (filled[-s:, -s:] > 0).any())
    window = filled[-side:, -side:]
    corners = [filled[:2, :2].mean(), filled[:2, -2:].mean(), filled[-2:, :2].mean(), window[window > 0].mean()]
    tl, tr, bl, br = corners
    rows, cols = np.mgrid[0:40, 0:40] / 39.0
    surface = (tl * (1 - rows) + bl * rows) * (1 - cols) + (tr * (1 - rows) + br * rows) * cols
    expected = (np.abs(surface - filled) > 7e-3) & (filled != 0)
    got = corner_plane_mask(depth)
    np.testing.assert_array_equal(got, expected)
    assert got[bump].all()
    quadrant = depth.copy()
    quadrant[14:, 14:] = 0  # no depth left in the bottom-right quadrant after the fills: an empty mask
    assert not corner_plane_mask(quadrant).any()


def _inputs(xyz: np.ndarray, valid: np.ndarray) -> ModelInput:
    size = xyz.shape[0]
    return ModelInput(torch.zeros(3, size, size), xyz.astype(np.float32), valid, None, 0, (size, size), size, (0, 0))


def test_grid_resize_is_the_official_bilinear_point_sampling() -> None:
    rng = np.random.default_rng(1)
    values = rng.random((64, 64))
    # align_corners=False at a factor of 8 reads the two middle pixels of each 8-block per axis.
    reference = values.reshape(8, 8, 8, 8)[:, 3:5, :, 3:5].mean(axis=(1, 3))
    np.testing.assert_allclose(to_grid(values, 8).numpy(), reference, atol=1e-12)


def test_foreground_grid_rules_and_the_empty_fallback() -> None:
    depth, bump = _tilted_scene(64)
    xyz = np.zeros((64, 64, 3))
    xyz[..., 0], xyz[..., 1], xyz[..., 2] = 0.1, 0.1, depth
    valid = np.ones((64, 64), dtype=bool)
    plane = foreground_grid(_inputs(xyz, valid), "corner_plane", 8)
    np.testing.assert_array_equal(plane.numpy(), to_grid(bump.astype(float), 8).numpy() >= 0.5)
    only_object = np.where(bump[..., None], xyz, 0)
    valid_rule = foreground_grid(_inputs(only_object, bump), "valid", 8)
    np.testing.assert_array_equal(valid_rule.numpy(), plane.numpy())
    signed = xyz.copy()
    signed[..., 2] = np.where(bump, 0.01, 0.0)
    signed[:8, :8, 2] = -0.5  # negative Z is not foreground under z_positive
    z_rule = foreground_grid(_inputs(signed, valid), "z_positive", 8)
    np.testing.assert_array_equal(z_rule.numpy(), to_grid(signed[..., 2], 8).numpy() > 0)
    flat = xyz.copy()
    flat[..., 2] = 0.6  # no foreground at all: every patch is scored rather than none
    assert foreground_grid(_inputs(flat, valid), "corner_plane", 8).all()


@pytest.mark.parametrize(
    ("rule", "fmt", "plane_removed", "expected"),
    [
        ("auto", "mvtec3d", False, "corner_plane"),
        ("auto", "folder", False, "corner_plane"),
        ("auto", "mvtec3d", True, "valid"),
        ("auto", "eyecandies", False, "valid"),
        ("z_positive", "mvtec3d", False, "z_positive"),
        ("corner_plane", "eyecandies", True, "corner_plane"),
    ],
)
def test_auto_rule_follows_the_format_and_profile(rule: str, fmt: str, plane_removed: bool, expected: str) -> None:
    assert resolve_rule(rule, fmt, plane_removed) == expected


def test_unknown_rule_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown foreground rule"):
        resolve_rule("magic", "mvtec3d", False)


def test_corner_plane_reads_the_image_footprint_not_the_zero_padding() -> None:
    """A non-square sample is zero-padded to a square canvas; the canvas corners have no depth (the official code,
    which never pads, would get NaN there), so the surface is fitted on the image's own corners."""
    depth, bump = _tilted_scene(80)
    depth, bump = depth[10:70], bump[10:70]  # 60×80: padded to a 100×100 canvas
    xyz = np.stack([np.full_like(depth, 0.1), np.full_like(depth, 0.1), depth], axis=-1).astype(np.float32)
    sample = Sample(np.zeros((60, 80, 3), np.uint8), xyz, np.ones((60, 80), bool), None, 0, "c", "good")
    inputs = prepare_input(sample, size=100)
    mask = foreground_grid(inputs, "corner_plane", 10)
    canvas = np.zeros((100, 100), dtype=bool)
    canvas[20:80, 10:90] = bump
    np.testing.assert_array_equal(mask.numpy(), to_grid(canvas.astype(float), 10).numpy() >= 0.5)
    assert 0 < int(mask.sum()) < 100  # neither empty nor the all-patches fallback
