"""A small vectorised renderer: a pinhole camera above a tilted plane carrying one height-field object.

Rays are intersected with the height field by marching down in height levels (2 mm apart) and refining the
first crossing by bisection, all as whole-array numpy operations. Along one ray the object coordinates are linear
in the height above the plane, so each level costs one evaluation of the height field for all candidate rays.
The result is an organized point cloud in camera coordinates (x right, y down, z depth, metres), as the
MVTec 3D-AD sensor gives, plus what the generator needs to colour and shade it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

HeightField = Callable[[np.ndarray, np.ndarray], np.ndarray]

SCENE_WIDTH = 0.12
"""Width (m) of the plane seen across the shorter image side at the nominal distance."""
NOMINAL_DISTANCE = 0.40
"""Nominal camera-to-plane distance (m)."""


@dataclass(frozen=True)
class Camera:
    """A pinhole camera; the principal point is off the pixel grid so no valid point has x or y exactly 0."""

    height: int
    width: int
    focal: float
    cx: float
    cy: float

    @classmethod
    def for_size(cls, height: int, width: int) -> Camera:
        """The camera that sees :data:`SCENE_WIDTH` across the shorter side at :data:`NOMINAL_DISTANCE`."""
        focal = min(height, width) * NOMINAL_DISTANCE / SCENE_WIDTH
        return cls(height, width, focal, (width - 1) / 2.0 + 0.37, (height - 1) / 2.0 + 0.29)

    def rays(self) -> np.ndarray:
        """H×W×3 ray directions with z = 1, so a point on a ray is ``depth * ray``."""
        j, i = np.meshgrid(np.arange(self.width, dtype=np.float64), np.arange(self.height, dtype=np.float64))
        return np.stack([(j - self.cx) / self.focal, (i - self.cy) / self.focal, np.ones_like(i)], axis=-1)

    @property
    def pixel_size(self) -> float:
        """Metres per pixel on the plane at the nominal distance."""
        return NOMINAL_DISTANCE / self.focal


@dataclass(frozen=True)
class Pose:
    """Where the plane and the object are.

    Attributes:
        origin: A point of the plane (on the optical axis).
        normal: Unit plane normal pointing towards the camera.
        e1: First in-plane axis.
        e2: Second in-plane axis.
        centre: Object centre, on the plane.
        angle: In-plane rotation of the object (rad).
    """

    origin: np.ndarray
    normal: np.ndarray
    e1: np.ndarray
    e2: np.ndarray
    centre: np.ndarray
    angle: float

    @classmethod
    def random(cls, rng: np.random.Generator, max_shift: float = 0.003, max_tilt_deg: float = 4.0) -> Pose:
        """A slightly tilted plane about 0.4 m away, the object at a random rotation and small shift."""
        distance = rng.uniform(NOMINAL_DISTANCE - 0.02, NOMINAL_DISTANCE + 0.02)
        tilt = np.deg2rad(rng.uniform(0.0, max_tilt_deg))
        azimuth = rng.uniform(0.0, 2.0 * np.pi)
        normal = np.array([np.sin(tilt) * np.cos(azimuth), np.sin(tilt) * np.sin(azimuth), -np.cos(tilt)])
        e1 = np.array([1.0, 0.0, 0.0]) - normal[0] * normal
        e1 /= np.linalg.norm(e1)
        e2 = np.cross(normal, e1)
        origin = np.array([0.0, 0.0, distance])
        shift = rng.uniform(-max_shift, max_shift, size=2)
        centre = origin + shift[0] * e1 + shift[1] * e2
        return cls(origin, normal, e1, e2, centre, float(rng.uniform(0.0, 2.0 * np.pi)))


@dataclass
class Trace:
    """Where each pixel's ray meets the scene.

    Attributes:
        xyz: H×W×3 clean points (m, camera coordinates).
        s: H×W height above the plane (m).
        a: H×W first object coordinate (m).
        b: H×W second object coordinate (m).
        u: H×W first plane coordinate (m), fixed to the plane rather than to the object.
        v: H×W second plane coordinate (m).
        a_above: H×W first object coordinate of the ray just before it met the surface, a hair above it.
        b_above: H×W second object coordinate of that point. Across a vertical step it lies on the far side of
            the step, which tells a wall of the object from the bottom of a groove.
    """

    xyz: np.ndarray
    s: np.ndarray
    a: np.ndarray
    b: np.ndarray
    u: np.ndarray
    v: np.ndarray
    a_above: np.ndarray
    b_above: np.ndarray


def trace(
    camera: Camera, pose: Pose, height: HeightField, top: float, bound: float, step: float = 0.002, refine: int = 11
) -> Trace:
    """Intersect every pixel's ray with the plane plus the height field.

    Args:
        camera: The camera.
        pose: Plane and object placement.
        height: Height field in object coordinates; must be >= 0 everywhere and < ``top``.
        top: A height (m) above every point of the surface.
        bound: Radius (m) around the object centre outside which the height field is 0.
        step: Height spacing of the marching levels.
        refine: Bisection steps on the first crossing.
    """
    rays = camera.rays()
    n_dot_r = rays @ pose.normal  # < 0: rays go away from the camera, against the normal
    n_dot_o = float(pose.normal @ pose.origin)
    depth0 = n_dot_o / n_dot_r  # depth of the plane hit (s = 0); depth(s) = depth0 + s / n_dot_r
    cos_t, sin_t = np.cos(pose.angle), np.sin(pose.angle)

    def plane_coords(axis: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        along = rays @ axis
        return depth0 * along - float(pose.centre @ axis), along / n_dot_r

    u0, du = plane_coords(pose.e1)
    v0, dv = plane_coords(pose.e2)
    a0, da = cos_t * u0 + sin_t * v0, cos_t * du + sin_t * dv
    b0, db = -sin_t * u0 + cos_t * v0, -sin_t * du + cos_t * dv

    s = np.zeros(rays.shape[:2])
    s_above = np.zeros(rays.shape[:2])
    reach = np.hypot(a0, b0) - top * np.hypot(da, db)
    cand = np.nonzero(reach < bound + 0.001)
    if cand[0].size:
        ca, cda, cb, cdb = a0[cand], da[cand], b0[cand], db[cand]
        levels = np.linspace(top, 0.0, max(2, int(np.ceil(top / step)) + 1))
        lv = levels[:, None]
        hit = height(ca + lv * cda, cb + lv * cdb) >= lv
        hit[-1] = True  # the plane itself
        first = np.argmax(hit, axis=0)
        hi = levels[first]
        lo = levels[np.maximum(first - 1, 0)]
        for _ in range(refine):
            mid = 0.5 * (lo + hi)
            inside = height(ca + mid * cda, cb + mid * cdb) >= mid
            hi = np.where(inside, mid, hi)
            lo = np.where(inside, lo, mid)
        s[cand] = hi
        s_above[cand] = lo
    depth = depth0 + s / n_dot_r
    return Trace(
        xyz=depth[..., None] * rays,
        s=s,
        a=a0 + s * da,
        b=b0 + s * db,
        u=u0 + s * du,
        v=v0 + s * dv,
        a_above=a0 + s_above * da,
        b_above=b0 + s_above * db,
    )


def normals(xyz: np.ndarray) -> np.ndarray:
    """Unit surface normals of an organized point cloud from image-space differences, facing the camera.

    Across a depth jump the difference spans the jump, which tilts the normal to grazing: that is what makes
    steep edges dark and lets the generator drop them as a structured-light sensor does.
    """
    d_row = np.gradient(xyz, axis=0)
    d_col = np.gradient(xyz, axis=1)
    n = np.cross(d_col, d_row)
    n /= np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-12)
    facing = np.sum(n * xyz, axis=-1, keepdims=True) > 0
    return np.where(facing, -n, n)


def lambert(xyz: np.ndarray, normal: np.ndarray, light: np.ndarray, ambient: float = 0.35) -> np.ndarray:
    """Ambient + Lambertian shading factor (H×W) for a distant light in direction ``light`` (towards the light)."""
    return ambient + (1.0 - ambient) * np.clip(normal @ light, 0.0, 1.0)


def grazing(xyz: np.ndarray, normal: np.ndarray, limit: float = 0.2) -> np.ndarray:
    """H×W bool: surfaces seen at a grazing angle (|cos| < ``limit``), which the sensor cannot measure."""
    view = xyz / np.maximum(np.linalg.norm(xyz, axis=-1, keepdims=True), 1e-12)
    return np.abs(np.sum(normal * view, axis=-1)) < limit
