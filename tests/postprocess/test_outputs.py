from __future__ import annotations

import numpy as np

from mmiad.postprocess.outputs import colorize, overlay


def test_colorize_ends_and_monotone_red() -> None:
    ramp = colorize(np.linspace(0, 1, 11))
    assert tuple(ramp[0]) == (0, 0, 128)
    assert tuple(ramp[-1]) == (200, 0, 0)
    assert tuple(colorize(np.array([2.0]))[0]) == (200, 0, 0)


def test_overlay_leaves_zero_score_pixels_untouched() -> None:
    rgb = np.full((4, 4, 3), 100, np.uint8)
    anomaly = np.zeros((4, 4), np.float32)
    anomaly[0, 0] = 1.0
    blended = overlay(rgb, anomaly, scale=1.0, alpha=0.5)
    assert np.array_equal(blended[1:, 1:], rgb[1:, 1:])
    assert tuple(blended[0, 0]) == (150, 50, 50)
