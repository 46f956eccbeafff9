"""One synthetic sample: draw a scene, render it nominal, then (for a test defect) render it again with the defect.

Both renders share every random draw (pose, colours, sensor noise, dropout), so the difference between them is
exactly what the defect changed; the ground-truth mask is that difference, restricted to the object. The
nominal render is kept, which lets tests check that a colour-only or cross-modal defect leaves the point cloud
bit-for-bit nominal.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mmiad.data.synthetic.defects import CROSSMODAL, DEFECT_KINDS, MAX_RAISE, Defect, make_defect
from mmiad.data.synthetic.render import Camera, Pose, grazing, lambert, normals, trace
from mmiad.data.synthetic.shapes import BACKGROUND, Look, ObjectShape, make_shape

XYZ_NOISE = 0.0003
"""Sensor noise (m, along the ray)."""
RGB_NOISE = 0.012
"""Image noise (fraction of full scale)."""
WALL_TOLERANCE = 0.0005
"""Height step (m) that makes a vertical side."""
GEOMETRY_CHANGE = 0.00005
"""A point that moved more than this (m) counts as changed by a defect (far above the renderer's ~1 µm error)."""
DEFECT_MIN_HEIGHT = 0.006
"""Defects are centred on object points at least this high (m), well clear of the plane-removal threshold."""
MIN_DEFECT_PIXELS = 4
MAX_DEFECT_TRIES = 12


@dataclass
class Frame:
    """One rendered view.

    Attributes:
        rgb: H×W×3 uint8 image.
        xyz: H×W×3 float32 point cloud (m), invalid points exactly 0.
        part: H×W int part id (0 background plane).
        height: H×W clean height above the plane (m).
        albedo: H×W×3 float albedo before shading.
        clean_xyz: H×W×3 float64 points before noise and dropout.
        grazing: H×W bool where the surface is too steep for the sensor.
    """

    rgb: np.ndarray
    xyz: np.ndarray
    part: np.ndarray
    height: np.ndarray
    albedo: np.ndarray
    clean_xyz: np.ndarray
    grazing: np.ndarray

    @property
    def object_mask(self) -> np.ndarray:
        """H×W bool of pixels that see the object rather than the plane."""
        return self.part != BACKGROUND


@dataclass
class Synthesized:
    """A generated sample.

    Attributes:
        sample: What gets written (defective for a defect sample).
        nominal: The same scene without the defect (the same object as ``sample`` for good samples).
        gt_mask: H×W bool ground truth for a defect sample, None for a good one.
        defect: The defect drawn, or None.
    """

    sample: Frame
    nominal: Frame
    gt_mask: np.ndarray | None
    defect: Defect | None


@dataclass(frozen=True)
class _Scene:
    camera: Camera
    shape: ObjectShape
    pose: Pose
    look: Look
    light: np.ndarray
    exposure: float
    xyz_noise: np.ndarray
    rgb_noise: np.ndarray
    dropout: np.ndarray


def _draw_scene(category: str, size: tuple[int, int], rng: np.random.Generator) -> _Scene:
    height, width = size
    shape = make_shape(category, rng)
    pose = Pose.random(rng)
    look = shape.make_look(rng)
    light = np.array([0.35 + 0.1 * rng.standard_normal(), -0.45 + 0.1 * rng.standard_normal(), -1.0])
    light /= np.linalg.norm(light)
    exposure = float(rng.uniform(0.92, 1.05))
    xyz_noise = XYZ_NOISE * rng.standard_normal((height, width))
    rgb_noise = RGB_NOISE * rng.standard_normal((height, width, 3))
    dropout = rng.random((height, width)) < rng.uniform(0.01, 0.03)
    # A thin band along one image border where the sensor returns nothing, as in the real scans.
    band = int(rng.integers(1, max(2, round(0.04 * min(height, width))) + 1))
    side = int(rng.integers(4))
    rows, cols = np.arange(height)[:, None], np.arange(width)[None, :]
    edge = (rows, height - 1 - rows, cols, width - 1 - cols)[side]
    dropout = dropout | np.broadcast_to(edge < band, (height, width))
    return _Scene(Camera.for_size(height, width), shape, pose, look, light, exposure, xyz_noise, rgb_noise, dropout)


def _background_albedo(scene: _Scene, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The plane: its colour with a faint low-frequency mottle fixed to the plane."""
    look = scene.look
    k = 2.0 * np.pi / 0.03
    mottle = sum(
        np.sin(k * (dx * u + dy * v) + ph) for (dx, dy), ph in zip(look.wave_dirs, look.wave_phases, strict=True)
    )
    return np.clip(look.colours[BACKGROUND] * (1.0 + 0.03 * mottle)[..., None], 0.0, 1.0)


def _render(scene: _Scene, defect: Defect | None) -> Frame:
    shape = scene.shape
    dh_field = defect.dh if defect is not None else None

    def surface(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        h = shape.height(a, b)
        if dh_field is None:
            return h
        return np.maximum(h + np.where(h > 0, dh_field(a, b), 0.0), 0.0)

    # The same marching levels with and without the defect, so pixels it does not touch render bit-identically.
    top = shape.max_height + MAX_RAISE + 0.002
    hit = trace(scene.camera, scene.pose, surface, top, shape.bound_radius)
    h_nominal = shape.height(hit.a, hit.b)
    dh = np.where(h_nominal > 0, dh_field(hit.a, hit.b), 0.0) if dh_field is not None else 0.0
    on_object = (hit.s > 1e-4) | (h_nominal > 1e-4)
    # A side of the nominal object: the ray came down past the nominal footprint's edge (the nominal surface
    # just before the hit is far below) onto a point well under the nominal top. The far wall of a hole or a
    # groove fails the first test, so a geometric defect does not take on the colour of the object's sides.
    below_before = shape.height(hit.a_above, hit.b_above) < hit.s - WALL_TOLERANCE
    wall = below_before & (hit.s - dh < h_nominal - WALL_TOLERANCE)

    a, b = hit.a[on_object], hit.b[on_object]
    part = np.zeros(on_object.shape, dtype=np.int64)
    part_obj = shape.part(a, b, wall[on_object])
    albedo_obj = shape.albedo(part_obj, a, b, scene.look)
    if defect is not None and defect.paint is not None:
        new_part, albedo_obj = defect.paint(a, b, part_obj, albedo_obj)
        relabelled = new_part != part_obj
        if relabelled.any():
            albedo_obj[relabelled] = shape.albedo(new_part[relabelled], a[relabelled], b[relabelled], scene.look)
        part_obj = new_part
    part[on_object] = part_obj
    albedo = _background_albedo(scene, hit.u, hit.v)
    albedo[on_object] = albedo_obj

    normal = normals(hit.xyz)
    shade = lambert(hit.xyz, normal, scene.light) * scene.exposure
    rgb = np.clip(albedo * shade[..., None] + scene.rgb_noise, 0.0, 1.0)
    rgb = np.round(rgb * 255.0).astype(np.uint8)

    steep = grazing(hit.xyz, normal)
    invalid = steep | scene.dropout
    if defect is not None and defect.invalid is not None:
        invalid |= on_object & defect.invalid(hit.a, hit.b)
    distance = np.linalg.norm(hit.xyz, axis=-1)
    xyz = hit.xyz * (1.0 + scene.xyz_noise / distance)[..., None]
    xyz[invalid] = 0.0
    return Frame(
        rgb=rgb, xyz=xyz.astype(np.float32), part=part, height=hit.s, albedo=albedo, clean_xyz=hit.xyz, grazing=steep
    )


def _changed(nominal: Frame, defective: Frame) -> np.ndarray:
    """Pixels where the defect changed the data: geometry, validity or colour, on the object only."""
    moved = np.linalg.norm(defective.clean_xyz - nominal.clean_xyz, axis=-1) > GEOMETRY_CHANGE
    validity = (nominal.xyz != 0).any(axis=-1) != (defective.xyz != 0).any(axis=-1)
    recoloured = (defective.albedo != nominal.albedo).any(axis=-1)
    return (moved | validity | recoloured) & (nominal.object_mask | defective.object_mask)


def synthesize(
    category: str, size: tuple[int, int], rng: np.random.Generator, defect: str | None = None
) -> Synthesized:
    """Generate one sample of ``category`` at ``size`` (height, width), with a defect of type ``defect`` or none.

    Raises:
        ValueError: for an unknown category or defect type.
        RuntimeError: when no placement of the defect changes enough pixels (the image is too small).
    """
    if defect is not None and defect not in DEFECT_KINDS:
        raise ValueError(f"unknown defect type {defect!r}; expected one of {tuple(DEFECT_KINDS)}")
    scene = _draw_scene(category, size, rng)
    nominal = _render(scene, None)
    if defect is None:
        return Synthesized(sample=nominal, nominal=nominal, gt_mask=None, defect=None)

    shape = scene.shape
    wall_parts = [i + 1 for i, name in enumerate(shape.parts) if name == "side"]
    eligible = nominal.object_mask & ~nominal.grazing & (nominal.height >= DEFECT_MIN_HEIGHT)
    eligible &= ~np.isin(nominal.part, wall_parts)
    a_nom, b_nom = _object_coords(scene, nominal)
    for _ in range(MAX_DEFECT_TRIES):
        # A crossmodal patch goes on a surface of the kind whose colour it does *not* normally have.
        allowed = eligible & np.isin(nominal.part, shape.crossmodal_targets) if defect == CROSSMODAL else eligible
        rows, cols = np.nonzero(allowed)
        if rows.size == 0:
            break
        pick = int(rng.integers(rows.size))
        centre = (float(a_nom[rows[pick], cols[pick]]), float(b_nom[rows[pick], cols[pick]]))
        drawn = make_defect(defect, rng, centre, shape, scene.camera.pixel_size)
        sample = _render(scene, drawn)
        mask = _changed(nominal, sample)
        if mask.sum() >= MIN_DEFECT_PIXELS:
            return Synthesized(sample=sample, nominal=nominal, gt_mask=mask, defect=drawn)
    raise RuntimeError(f"could not place a visible {defect!r} defect on {category!r} at image size {size}")


def _object_coords(scene: _Scene, frame: Frame) -> tuple[np.ndarray, np.ndarray]:
    """Object coordinates (a, b) of every clean point of a frame."""
    offset = frame.clean_xyz - scene.pose.centre
    u, v = offset @ scene.pose.e1, offset @ scene.pose.e2
    cos_t, sin_t = np.cos(scene.pose.angle), np.sin(scene.pose.angle)
    return cos_t * u + sin_t * v, -sin_t * u + cos_t * v
