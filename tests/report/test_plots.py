"""SVG curves: the drawn points are the curve's points in the frame, thinning and clipping keep its shape."""

from __future__ import annotations

import re

import numpy as np
import pytest

from mmiad.report.plots import MARGIN_LEFT, MARGIN_TOP, Frame, clip_curve, svg_curve, thin_curve


def _points(svg: str, css_class: str) -> np.ndarray:
    match = re.search(rf'<polyline class="{css_class}" points="([^"]+)"', svg)
    assert match, f"no {css_class} polyline"
    return np.array([[float(v) for v in pair.split(",")] for pair in match.group(1).split()])


def test_roc_polyline_has_the_known_points() -> None:
    # ROC of labels (0, 0, 1, 1) and scores (0.1, 0.6, 0.4, 0.8): (0,0) (0,0.5) (0.5,0.5) (0.5,1) (1,1).
    fpr = np.array([0.0, 0.0, 0.5, 0.5, 1.0])
    tpr = np.array([0.0, 0.5, 0.5, 1.0, 1.0])
    svg = svg_curve(fpr, tpr, title="roc", x_label="fpr", y_label="tpr", chance=True, css_class="roc")
    frame = Frame()
    w, h = frame.plot_width, frame.plot_height
    expected = [
        (MARGIN_LEFT, MARGIN_TOP + h),
        (MARGIN_LEFT, MARGIN_TOP + h / 2),
        (MARGIN_LEFT + w / 2, MARGIN_TOP + h / 2),
        (MARGIN_LEFT + w / 2, MARGIN_TOP),
        (MARGIN_LEFT + w, MARGIN_TOP),
    ]
    np.testing.assert_allclose(_points(svg, "roc"), expected, atol=0.006)
    np.testing.assert_allclose(_points(svg, "chance"), [expected[0], expected[-1]], atol=0.006)
    assert "http" not in svg


def test_pro_frame_spans_fpr_0_to_0_3() -> None:
    svg = svg_curve(np.array([0.0, 0.3]), np.array([0.0, 1.0]), title="p", x_label="x", y_label="y", x_max=0.3)
    frame = Frame(x_max=0.3)
    np.testing.assert_allclose(
        _points(svg, "curve"),
        [(MARGIN_LEFT, MARGIN_TOP + frame.plot_height), (MARGIN_LEFT + frame.plot_width, MARGIN_TOP)],
    )


def test_missing_curve_says_undefined() -> None:
    svg = svg_curve(None, None, title="t", x_label="x", y_label="y")
    assert "undefined" in svg and "<polyline" not in svg


def test_clip_curve_interpolates_at_the_limit() -> None:
    x, y = clip_curve(np.array([0.0, 0.2, 0.4, 1.0]), np.array([0.0, 0.5, 0.9, 1.0]), 0.3)
    np.testing.assert_allclose(x, [0.0, 0.2, 0.3])
    np.testing.assert_allclose(y, [0.0, 0.5, 0.7])
    # A point exactly on the limit is kept as is.
    x, y = clip_curve(np.array([0.0, 0.3, 1.0]), np.array([0.0, 0.4, 1.0]), 0.3)
    np.testing.assert_allclose(x, [0.0, 0.3])
    np.testing.assert_allclose(y, [0.0, 0.4])


def test_thin_curve_drops_invisible_points_only() -> None:
    x = np.linspace(0, 1, 100_001)
    y = np.sqrt(x)
    tx, ty = thin_curve(x, y, 0.01)
    assert 50 < tx.size < 250
    assert (tx[0], tx[-1]) == (0.0, 1.0)
    # Every dropped point lies within the tolerance of the thinned line (monotone curve).
    np.testing.assert_array_less(np.abs(np.interp(x, tx, ty) - y), 0.011)
    with pytest.raises(ValueError, match="empty"):
        clip_curve(np.array([]), np.array([]), 0.3)
