"""Geometry and texture of the synthetic object categories.

Every object is a height field ``h(a, b) >= 0`` above the background plane, in object coordinates (metres, the
object's own frame after its in-plane rotation). A camera looking roughly down at the plane sees a height field
well: only thin vertical walls hide, as they do for the real sensor.

Colour is tied to *surface type* on purpose: each category splits its surface into parts (a flat top, a chamfer,
a vertical side, the inner or outer half of a torus) and gives every part its own colour and texture. A
cross-modal method can then learn "this geometry has this colour", which is exactly what the ``crossmodal``
defect breaks (a normal colour painted onto the wrong kind of surface).

Part ids: 0 is the background plane; 1… are the category's parts in the order of :attr:`ObjectShape.parts`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BACKGROUND = 0


@dataclass(frozen=True)
class Look:
    """Per-sample appearance: jittered part colours and the phases of the texture patterns.

    Attributes:
        colours: (P+1)×3 albedo in [0, 1]; row 0 is the background plane, row p is part p.
        wave_dirs: 3×2 unit directions of the fine texture waves.
        wave_phases: 3 phases of the fine texture waves.
    """

    colours: np.ndarray
    wave_dirs: np.ndarray
    wave_phases: np.ndarray


def _fine_texture(a: np.ndarray, b: np.ndarray, look: Look, period: float = 0.0021) -> np.ndarray:
    """A zero-mean pattern in [-1, 1] from three crossing waves: cheap, smooth and fixed to the object."""
    k = 2.0 * np.pi / period
    total = np.zeros(np.broadcast(a, b).shape, dtype=np.float64)
    for (dx, dy), phase in zip(look.wave_dirs, look.wave_phases, strict=True):
        total += np.sin(k * (dx * a + dy * b) + phase)
    return total / 3.0


class ObjectShape:
    """One object category: its height field, its surface parts and their colours.

    Subclasses set the class attributes and implement :meth:`height`, :meth:`part` and optionally
    :meth:`pattern`. Instances carry the per-sample size jitter (``scale``).

    Attributes:
        name: Category name.
        parts: Names of the surface parts, part id = index + 1.
        palette: Nominal albedo per part (same order as ``parts``).
        background: Nominal albedo of the background plane.
        crossmodal_source: The part whose colour the ``crossmodal`` defect paints.
        crossmodal_targets: The parts (of another surface type) it paints onto.
    """

    name: str = ""
    parts: tuple[str, ...] = ()
    palette: tuple[tuple[float, float, float], ...] = ()
    background: tuple[float, float, float] = (0.55, 0.55, 0.57)
    crossmodal_source: int = 1
    crossmodal_targets: tuple[int, ...] = ()

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = float(scale)

    @property
    def bound_radius(self) -> float:
        """Radius (m) of a circle around the origin that contains the whole footprint."""
        raise NotImplementedError

    @property
    def max_height(self) -> float:
        """The highest point (m) of the nominal object above the plane."""
        raise NotImplementedError

    def height(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Nominal height (m) above the plane; 0 outside the footprint."""
        raise NotImplementedError

    def part(self, a: np.ndarray, b: np.ndarray, wall: np.ndarray) -> np.ndarray:
        """Part id (1…) of object points; ``wall`` marks points on a vertical side of the nominal object."""
        raise NotImplementedError

    def pattern(self, part: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Multiplicative brightness pattern (around 1) per point; plain by default."""
        return np.ones(np.shape(part))

    def make_look(self, rng: np.random.Generator) -> Look:
        """Draw this sample's colours: the palette with a few % of per-channel jitter, as lighting would vary."""
        base = np.array((self.background, *self.palette), dtype=np.float64)
        colours = np.clip(base * (1.0 + 0.025 * rng.standard_normal(base.shape)), 0.0, 1.0)
        angles = rng.uniform(0.0, np.pi, size=3) + np.array([0.0, np.pi / 3, 2 * np.pi / 3])
        return Look(
            colours=colours,
            wave_dirs=np.stack([np.cos(angles), np.sin(angles)], axis=1),
            wave_phases=rng.uniform(0.0, 2 * np.pi, size=3),
        )

    def albedo(self, part: np.ndarray, a: np.ndarray, b: np.ndarray, look: Look) -> np.ndarray:
        """Albedo (…×3, [0, 1]) of object points given their part ids (ids > 0)."""
        colour = look.colours[part]
        shade = self.pattern(part, a, b) * (1.0 + 0.04 * _fine_texture(a, b, look))
        return np.clip(colour * shade[..., None], 0.0, 1.0)


class Puck(ObjectShape):
    """A flat cylinder with a 45° chamfer; its top is two-tone (a red disc in a beige ring)."""

    name = "puck"
    parts = ("top_inner", "top_outer", "chamfer", "side")
    palette = ((0.78, 0.22, 0.16), (0.82, 0.79, 0.70), (0.36, 0.36, 0.42), (0.20, 0.36, 0.72))
    background = (0.52, 0.55, 0.58)
    crossmodal_source = 3
    crossmodal_targets = (1, 2)

    @property
    def radius(self) -> float:
        return 0.024 * self.scale

    @property
    def bound_radius(self) -> float:
        return self.radius

    @property
    def max_height(self) -> float:
        return 0.012 * self.scale

    @property
    def chamfer(self) -> float:
        return 0.003 * self.scale

    def height(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        rho = np.hypot(a, b)
        top = np.minimum(self.max_height, self.max_height - self.chamfer + (self.radius - rho))
        return np.where(rho <= self.radius, top, 0.0)

    def part(self, a: np.ndarray, b: np.ndarray, wall: np.ndarray) -> np.ndarray:
        rho = np.hypot(a, b)
        part = np.where(rho < 0.55 * self.radius, 1, 2)
        part = np.where(rho > self.radius - self.chamfer, 3, part)
        return np.where(wall, 4, part)


class Dome(ObjectShape):
    """A spherical cap: a green, flat-ish crown above yellow, steep flanks with meridian stripes."""

    name = "dome"
    parts = ("crown", "flank")
    palette = ((0.30, 0.64, 0.30), (0.86, 0.70, 0.20))
    background = (0.50, 0.50, 0.55)
    crossmodal_source = 2
    crossmodal_targets = (1,)

    @property
    def base_radius(self) -> float:
        return 0.022 * self.scale

    @property
    def bound_radius(self) -> float:
        return self.base_radius

    @property
    def max_height(self) -> float:
        return 0.018 * self.scale

    def height(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        rb, hd = self.base_radius, self.max_height
        sphere = (rb * rb + hd * hd) / (2.0 * hd)
        rho2 = a * a + b * b
        cap = (hd - sphere) + np.sqrt(np.maximum(sphere * sphere - rho2, 0.0))
        return np.where(rho2 < rb * rb, np.maximum(cap, 0.0), 0.0)

    def part(self, a: np.ndarray, b: np.ndarray, wall: np.ndarray) -> np.ndarray:
        return np.where(np.hypot(a, b) < 0.55 * self.base_radius, 1, 2)

    def pattern(self, part: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        stripes = 0.88 + 0.12 * np.cos(12.0 * np.arctan2(b, a))
        return np.where(part == 2, stripes, 1.0)


class Ring(ObjectShape):
    """A torus lying on the plane: its inward-facing half is magenta, its outward-facing half teal and knurled."""

    name = "ring"
    parts = ("inner", "outer")
    palette = ((0.70, 0.30, 0.60), (0.22, 0.60, 0.70))
    background = (0.58, 0.56, 0.52)
    crossmodal_source = 1
    crossmodal_targets = (2,)

    @property
    def major(self) -> float:
        return 0.019 * self.scale

    @property
    def minor(self) -> float:
        return 0.0065 * self.scale

    @property
    def bound_radius(self) -> float:
        return self.major + self.minor

    @property
    def max_height(self) -> float:
        return 2.0 * self.minor

    def height(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        off = np.hypot(a, b) - self.major
        inside = np.maximum(self.minor * self.minor - off * off, 0.0)
        return np.where(np.abs(off) < self.minor, self.minor + np.sqrt(inside), 0.0)

    def part(self, a: np.ndarray, b: np.ndarray, wall: np.ndarray) -> np.ndarray:
        return np.where(np.hypot(a, b) < self.major, 1, 2)

    def pattern(self, part: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        knurl = 0.9 + 0.1 * np.cos(36.0 * np.arctan2(b, a))
        return np.where(part == 2, knurl, 1.0)


class Block(ObjectShape):
    """A box with bevelled top edges: orange/white stripes on top, brown bevels, grey vertical sides."""

    name = "block"
    parts = ("stripe_a", "stripe_b", "bevel", "side")
    palette = ((0.88, 0.50, 0.14), (0.90, 0.88, 0.80), (0.46, 0.26, 0.15), (0.32, 0.32, 0.34))
    background = (0.54, 0.57, 0.54)
    crossmodal_source = 3
    crossmodal_targets = (1, 2)

    @property
    def half_length(self) -> float:
        return 0.020 * self.scale

    @property
    def half_width(self) -> float:
        return 0.013 * self.scale

    @property
    def bevel(self) -> float:
        return 0.0035 * self.scale

    @property
    def bound_radius(self) -> float:
        return float(np.hypot(self.half_length, self.half_width))

    @property
    def max_height(self) -> float:
        return 0.016 * self.scale

    def _edge_distance(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.minimum(self.half_length - np.abs(a), self.half_width - np.abs(b))

    def height(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        edge = self._edge_distance(a, b)
        top = np.minimum(self.max_height, self.max_height - self.bevel + edge)
        return np.where(edge >= 0.0, top, 0.0)

    def part(self, a: np.ndarray, b: np.ndarray, wall: np.ndarray) -> np.ndarray:
        period = 2.0 * self.half_length / 7.0
        part = np.where(np.floor((a + self.half_length) / period).astype(np.int64) % 2 == 0, 1, 2)
        part = np.where(self._edge_distance(a, b) < self.bevel, 3, part)
        return np.where(wall, 4, part)


SHAPES: dict[str, type[ObjectShape]] = {cls.name: cls for cls in (Puck, Dome, Ring, Block)}
CATEGORIES: tuple[str, ...] = tuple(SHAPES)


def make_shape(category: str, rng: np.random.Generator) -> ObjectShape:
    """An instance of ``category`` with a few % of size variation, the normal spread of a production line."""
    try:
        cls = SHAPES[category]
    except KeyError:
        raise ValueError(f"unknown synthetic category {category!r}; expected one of {CATEGORIES}") from None
    return cls(scale=float(rng.uniform(0.96, 1.04)))
