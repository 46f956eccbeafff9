"""ROC and PRO curves as inline SVG, drawn here so the report needs neither matplotlib nor a network.

An exact PRO curve has a point per distinct pixel score (up to millions), far more than a plot can show, so
curves are thinned to the points that move the line by a visible amount before they are written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

import numpy as np

WIDTH, HEIGHT = 320, 240
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 44, 12, 22, 36


@dataclass(frozen=True)
class Frame:
    """Where data coordinates land in the SVG: ``[0, x_max] × [0, y_max]`` inside the margins."""

    x_max: float = 1.0
    y_max: float = 1.0
    width: int = WIDTH
    height: int = HEIGHT

    @property
    def plot_width(self) -> float:
        return self.width - MARGIN_LEFT - MARGIN_RIGHT

    @property
    def plot_height(self) -> float:
        return self.height - MARGIN_TOP - MARGIN_BOTTOM

    def to_svg(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Data → SVG pixels (y grows downwards in SVG)."""
        px = MARGIN_LEFT + np.asarray(x, np.float64) / self.x_max * self.plot_width
        py = MARGIN_TOP + (1.0 - np.asarray(y, np.float64) / self.y_max) * self.plot_height
        return px, py


def clip_curve(x: np.ndarray, y: np.ndarray, x_max: float) -> tuple[np.ndarray, np.ndarray]:
    """The part of a non-decreasing-``x`` curve up to ``x_max``, ending on ``x_max`` by linear interpolation.

    This is the same cut the AUPRO integral makes, so the plotted area is the one the metric measures.
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if x.size == 0:
        raise ValueError("empty curve")
    end = int(np.searchsorted(x, x_max, side="right"))
    xs, ys = x[:end], y[:end]
    if end < x.size and (end == 0 or xs[-1] < x_max):
        if end == 0:
            return np.array([x_max]), np.array([y[0]])
        y_at = ys[-1] + (y[end] - ys[-1]) * (x_max - xs[-1]) / (x[end] - xs[-1])
        xs, ys = np.append(xs, x_max), np.append(ys, y_at)
    return xs, ys


def thin_curve(x: np.ndarray, y: np.ndarray, tolerance: float) -> tuple[np.ndarray, np.ndarray]:
    """Keep the first and last point and every point more than ``tolerance`` (in x or y) from the last kept one.

    With ``tolerance`` below one SVG pixel in data units the drawn line does not visibly change, while a curve of
    a million points shrinks to at most a few thousand.
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if x.size <= 2:
        return x, y
    keep = [0]
    last_x, last_y = x[0], y[0]
    for index in range(1, x.size - 1):
        if abs(x[index] - last_x) > tolerance or abs(y[index] - last_y) > tolerance:
            keep.append(index)
            last_x, last_y = x[index], y[index]
    keep.append(x.size - 1)
    return x[keep], y[keep]


def polyline_points(frame: Frame, x: np.ndarray, y: np.ndarray) -> str:
    """The ``points`` attribute of a polyline, in SVG pixels rounded to 0.01."""
    px, py = frame.to_svg(x, y)
    return " ".join(f"{a:.2f},{b:.2f}" for a, b in zip(px, py, strict=True))


def _axes(frame: Frame, x_label: str, y_label: str, ticks: Sequence[float]) -> list[str]:
    left, top = MARGIN_LEFT, MARGIN_TOP
    right, bottom = left + frame.plot_width, top + frame.plot_height
    parts = [f'<rect x="{left}" y="{top}" width="{frame.plot_width}" height="{frame.plot_height}" class="frame"/>']
    for fraction in ticks:
        px, _ = frame.to_svg(np.array([fraction * frame.x_max]), np.array([0.0]))
        _, py = frame.to_svg(np.array([0.0]), np.array([fraction * frame.y_max]))
        parts.append(f'<line x1="{px[0]:.2f}" y1="{top}" x2="{px[0]:.2f}" y2="{bottom}" class="grid"/>')
        parts.append(f'<line x1="{left}" y1="{py[0]:.2f}" x2="{right}" y2="{py[0]:.2f}" class="grid"/>')
        x_text, y_text = f"{fraction * frame.x_max:g}", f"{fraction * frame.y_max:g}"
        parts.append(f'<text x="{px[0]:.2f}" y="{bottom + 13}" text-anchor="middle">{x_text}</text>')
        parts.append(f'<text x="{left - 4}" y="{py[0] + 4:.2f}" text-anchor="end">{y_text}</text>')
    parts.append(f'<text x="{(left + right) / 2:.1f}" y="{frame.height - 4}" text-anchor="middle">{x_label}</text>')
    parts.append(
        f'<text x="12" y="{(top + bottom) / 2:.1f}" text-anchor="middle" '
        f'transform="rotate(-90 12 {(top + bottom) / 2:.1f})">{y_label}</text>'
    )
    return parts


def svg_curve(
    x: np.ndarray | None,
    y: np.ndarray | None,
    *,
    title: str,
    x_label: str,
    y_label: str,
    x_max: float = 1.0,
    chance: bool = False,
    css_class: str = "curve",
) -> str:
    """One curve in its frame; with no curve (a single-class test set) the frame says why instead.

    Args:
        x: Non-decreasing x values within ``[0, x_max]`` (e.g. FPR), or None.
        y: y values in ``[0, 1]`` (TPR or PRO), or None.
        title: Shown above the plot (escaped).
        x_label: Axis title (escaped).
        y_label: Axis title (escaped).
        x_max: Right end of the x axis (0.3 for the PRO curve).
        chance: Draw the diagonal of a random detector (for ROC curves).
        css_class: Class of the curve's polyline, so tests and styles can find it.
    """
    frame = Frame(x_max=x_max)
    parts = [
        f'<svg class="plot" width="{frame.width}" height="{frame.height}" '
        f'viewBox="0 0 {frame.width} {frame.height}" role="img" aria-label="{escape(title)}">',
        f'<text x="{frame.width / 2:.1f}" y="15" text-anchor="middle" class="title">{escape(title)}</text>',
        *_axes(frame, escape(x_label), escape(y_label), (0.0, 0.5, 1.0)),
    ]
    if chance:
        diagonal = polyline_points(frame, np.array([0.0, x_max]), np.array([0.0, x_max]))
        parts.append(f'<polyline class="chance" points="{diagonal}"/>')
    if x is None or y is None or len(x) == 0:
        cx, cy = MARGIN_LEFT + frame.plot_width / 2, MARGIN_TOP + frame.plot_height / 2
        parts.append(f'<text x="{cx:.1f}" y="{cy:.1f}" text-anchor="middle" class="empty">undefined</text>')
    else:
        tolerance = 0.5 / frame.plot_width * max(x_max, 1e-12)  # half a pixel on the shorter-scaled axis
        tx, ty = thin_curve(np.asarray(x), np.asarray(y), min(tolerance, 0.5 / frame.plot_height))
        parts.append(f'<polyline class="{css_class}" points="{polyline_points(frame, tx, ty)}"/>')
    parts.append("</svg>")
    return "".join(parts)
