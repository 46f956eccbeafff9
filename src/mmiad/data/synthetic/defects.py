"""Defects of the synthetic data: geometric, colour, combined and cross-modal.

A defect acts in object coordinates (metres) through up to three hooks, so a defect of one kind cannot leak into
the other modality by construction:

* ``dh(a, b)``: a height offset (geometry only; the renderer still shades it, as a camera would see a bump);
* ``invalid(a, b)``: where the sensor returns no point (the inside of a deep hole);
* ``paint(a, b, part, albedo)``: a new albedo, and possibly a new part id (colour only).

The ``crossmodal`` defect only relabels the part of a patch of the surface with another part of the same object,
so the patch takes a colour that is normal elsewhere on that object but wrong for its geometry (CFM, Fig. 3).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mmiad.data.synthetic.shapes import ObjectShape

GEOMETRIC = "geometric"
COLOUR = "colour"
BOTH = "both"
CROSSMODAL = "crossmodal"

DEFECT_KINDS: dict[str, str] = {
    "bump": GEOMETRIC,
    "dent": GEOMETRIC,
    "hole": GEOMETRIC,
    "crack": GEOMETRIC,
    "stain": COLOUR,
    "contamination": COLOUR,
    "combined": BOTH,
    "crossmodal": CROSSMODAL,
}
DEFECT_TYPES: tuple[str, ...] = tuple(DEFECT_KINDS)
MAX_RAISE = 0.005
"""No defect raises the surface more than this (m); the renderer starts its rays above it."""

_STAIN_COLOURS = np.array([(0.16, 0.10, 0.05), (0.09, 0.09, 0.11), (0.34, 0.30, 0.06)])
_SPECK_COLOURS = np.array([(0.05, 0.05, 0.05), (0.06, 0.08, 0.32), (0.30, 0.05, 0.04)])

Field = Callable[[np.ndarray, np.ndarray], np.ndarray]
Paint = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Defect:
    """One defect instance, placed on one object.

    Attributes:
        name: Defect type (the test folder name).
        centre: (a, b) centre in object coordinates (m).
        dh: Height offset field, or None for colour-only defects.
        invalid: Field of bools where the sensor sees nothing, or None.
        paint: ``(a, b, part, albedo) -> (part, albedo)``, or None for geometry-only defects.
        max_raise: Upper bound (m) of ``dh`` (at most :data:`MAX_RAISE`).
    """

    name: str
    centre: tuple[float, float]
    dh: Field | None = None
    invalid: Field | None = None
    paint: Paint | None = None
    max_raise: float = 0.0

    @property
    def kind(self) -> str:
        """``geometric``, ``colour``, ``both`` or ``crossmodal``."""
        return DEFECT_KINDS[self.name]


def _blob(a: np.ndarray, b: np.ndarray, centre: tuple[float, float], radius: float, phases: np.ndarray) -> np.ndarray:
    """Squared normalised distance to an irregular (wobbly-edged) blob: < 1 inside, grows outside."""
    da, db = a - centre[0], b - centre[1]
    angle = np.arctan2(db, da)
    wobble = 1.0 + 0.22 * np.sin(3.0 * angle + phases[0]) + 0.12 * np.sin(5.0 * angle + phases[1])
    return (da * da + db * db) / (radius * radius) * wobble


def _segment_distance(a: np.ndarray, b: np.ndarray, p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Distance from points (a, b) to the segment p–q."""
    d = q - p
    t = np.clip(((a - p[0]) * d[0] + (b - p[1]) * d[1]) / float(d @ d), 0.0, 1.0)
    return np.hypot(a - (p[0] + t * d[0]), b - (p[1] + t * d[1]))


def _bump(centre: tuple[float, float], amplitude: float, radius: float) -> Field:
    """A smooth bump (or dent, for a negative amplitude) with compact support: exactly 0 beyond ``radius``.

    Compact support keeps the ground truth honest: outside the mask the data is untouched, not merely close.
    """

    def field(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        q = ((a - centre[0]) ** 2 + (b - centre[1]) ** 2) / (radius * radius)
        return amplitude * np.maximum(1.0 - q, 0.0) ** 2

    return field


def _tint(weight: Field, colour: np.ndarray) -> Paint:
    """A paint that blends the albedo towards ``colour`` with a weight field in [0, 1]."""

    def paint(a: np.ndarray, b: np.ndarray, part: np.ndarray, albedo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        w = weight(a, b)[..., None]
        return part, albedo * (1.0 - w) + colour * w

    return paint


def make_defect(
    name: str, rng: np.random.Generator, centre: tuple[float, float], shape: ObjectShape, pixel: float
) -> Defect:
    """Draw a defect of type ``name`` centred at ``centre`` on ``shape``.

    Sizes scale with the object (a defect covers a few % of its area) but never go below about one pixel
    (``pixel``, metres per pixel on the plane), so small images still show every defect.
    """
    if name not in DEFECT_KINDS:
        raise ValueError(f"unknown defect type {name!r}; expected one of {DEFECT_TYPES}")
    radius = float(rng.uniform(0.15, 0.21)) * shape.bound_radius
    phases = rng.uniform(0.0, 2.0 * np.pi, size=2)
    if name == "bump":
        amplitude = float(rng.uniform(0.0025, 0.004))
        return Defect(name, centre, dh=_bump(centre, amplitude, radius), max_raise=amplitude)
    if name == "dent":
        return Defect(name, centre, dh=_bump(centre, -float(rng.uniform(0.002, 0.0035)), radius))
    if name == "hole":
        hole_radius = max(float(rng.uniform(0.55, 0.75)) * radius, 1.5 * pixel)
        depth = float(rng.uniform(0.005, 0.008))

        def hole_dh(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            return np.where(np.hypot(a - centre[0], b - centre[1]) < hole_radius, -depth, 0.0)

        def hole_invalid(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            return np.hypot(a - centre[0], b - centre[1]) < 0.6 * hole_radius

        return Defect(name, centre, dh=hole_dh, invalid=hole_invalid)
    if name == "crack":
        # Two segments with a kink at the centre: a thin groove, at least ~1.5 pixels wide to stay visible.
        length = float(rng.uniform(1.1, 1.6)) * radius
        heading = rng.uniform(0.0, 2.0 * np.pi)
        bend = rng.uniform(-0.5, 0.5)
        c = np.asarray(centre)
        p = c - length * np.array([np.cos(heading), np.sin(heading)])
        q = c + length * np.array([np.cos(heading + bend), np.sin(heading + bend)])
        half_width = max(0.0005, 0.8 * pixel)
        depth = float(rng.uniform(0.002, 0.003))

        def crack_dh(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            dist = np.minimum(_segment_distance(a, b, p, c), _segment_distance(a, b, c, q))
            return np.where(dist < half_width, -depth, 0.0)

        return Defect(name, centre, dh=crack_dh)
    if name == "stain":
        strength = float(rng.uniform(0.6, 0.85))
        colour = _STAIN_COLOURS[rng.integers(len(_STAIN_COLOURS))]

        def stain_weight(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            return strength * np.clip((1.3 - _blob(a, b, centre, radius, phases)) / 0.3, 0.0, 1.0)

        return Defect(name, centre, paint=_tint(stain_weight, colour))
    if name == "contamination":
        count = int(rng.integers(3, 8))
        offsets = rng.uniform(-1.0, 1.0, size=(count, 2)) * radius
        speck_radii = np.maximum(rng.uniform(0.5, 1.0, size=count) * 0.0012, 0.9 * pixel)
        colour = _SPECK_COLOURS[rng.integers(len(_SPECK_COLOURS))]

        def speck_weight(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            inside = np.zeros(np.broadcast(a, b).shape, dtype=bool)
            for (oa, ob), r in zip(offsets, speck_radii, strict=True):
                inside |= np.hypot(a - centre[0] - oa, b - centre[1] - ob) < r
            return inside.astype(np.float64)

        return Defect(name, centre, paint=_tint(speck_weight, colour))
    if name == "combined":
        # An impact mark: a dent whose bottom is discoloured.
        colour = _STAIN_COLOURS[rng.integers(len(_STAIN_COLOURS))]
        strength = float(rng.uniform(0.5, 0.75))

        def mark_weight(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            return strength * np.clip((1.2 - _blob(a, b, centre, 0.9 * radius, phases)) / 0.3, 0.0, 1.0)

        dh = _bump(centre, -float(rng.uniform(0.002, 0.003)), radius)
        return Defect(name, centre, dh=dh, paint=_tint(mark_weight, colour))
    # crossmodal: relabel a patch of the target surfaces with the source part; its colour follows the label.
    source, targets = shape.crossmodal_source, np.asarray(shape.crossmodal_targets)

    def relabel(a: np.ndarray, b: np.ndarray, part: np.ndarray, albedo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        patch = (_blob(a, b, centre, radius, phases) < 1.0) & np.isin(part, targets)
        return np.where(patch, source, part), albedo

    return Defect(name, centre, paint=relabel)
