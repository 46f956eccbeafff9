"""Pseudo-anomalies for training the fusion: one aligned RGB + 3D defect pasted into a nominal training sample.

Follows ``Dataset/mvtec3d_pseudo.py`` / ``eyecandies_pseudo.py`` / ``cut_paste.py`` of the official code:

1. the base (a random training sample) is augmented geometrically, RGB and xyz with one transform (nearest,
   fill 0), the coordinates only resampled in the image plane;
2. an RGB source (another training sample of the category) goes through 3 distinct colour augmenters;
3. a 3D source (from the anomaly-source list, cross-category) gives the relief;
4. a Perlin mask inside the allowed region, and per connected component a paste: in place when 2/3 of it lies
   on the base's foreground (RGB blended r·base + (1−r)·source, r ~ U(0, 0.5)), else moved onto a random
   foreground position (RGB hard-copied); the 3D patch is the source's relief re-centred on the base's points
   plus ±U(z_offset), x and y kept from the base.

Everything happens on the model-input copies (S×S arrays in memory, read from mmiad's preprocessed cache):
the user's dataset is only read. Deviations (working resolution, the colour augmenters, x/y where the base has
no point) are listed in the method README.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from mmiad.methods.g2sf.perlin import random_perlin_mask

#: The official base augmentations (degrees, flips, translate fraction, scale range).
RIGID = (10.0, False, 0.05, (0.9, 1.1))
ORGANIC = (45.0, True, 0.10, (0.8, 1.25))
EYECANDIES = (90.0, True, 0.025, (0.9, 1.1))
ORGANIC_CATEGORIES = frozenset({"bagel", "carrot", "cookie", "peach", "potato"})
#: Components below this area (px at the official ~800 px working side) are not pasted.
MIN_PASTE_AREA = 100
OFFICIAL_SIDE = 800


@dataclass
class Sample:
    """One sample as the synthesis sees it: RGB in [0, 255] (S×S×3 float32), xyz (S×S×3, zero = no point)."""

    rgb: np.ndarray
    xyz: np.ndarray

    @property
    def foreground(self) -> np.ndarray:
        """Pixels with a point (any non-zero coordinate, as the official masks)."""
        return np.any(self.xyz != 0, axis=-1)


def base_augmentation(fmt: str, category: str) -> tuple[float, bool, float, tuple[float, float]]:
    """(max rotation °, flips, max translation, scale range) of a category, per the official scripts."""
    if fmt == "eyecandies":
        return EYECANDIES
    return ORGANIC if category in ORGANIC_CATEGORIES else RIGID


def augment_geometry(
    sample: Sample, params: tuple[float, bool, float, tuple[float, float]], rng: np.random.Generator
) -> Sample:
    """Rotation → (flips) → affine (translate, scale), nearest, fill 0, one transform for RGB and xyz."""
    degrees, flips, translate, scale_range = params
    size = sample.rgb.shape[0]
    angle = math.radians(rng.uniform(-degrees, degrees))
    scale = rng.uniform(*scale_range)
    shift = rng.uniform(-translate, translate, size=2) * 2  # in the [-1, 1] grid's units
    flip = (rng.random() < 0.5, rng.random() < 0.5) if flips else (False, False)
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    theta = torch.tensor([[cos, -sin, -shift[0]], [sin, cos, -shift[1]]], dtype=torch.float32)
    stacked = torch.from_numpy(np.concatenate([sample.rgb, sample.xyz], axis=-1)).permute(2, 0, 1)[None].float()
    grid = F.affine_grid(theta[None], list(stacked.shape), align_corners=False)
    out = F.grid_sample(stacked, grid, mode="nearest", padding_mode="zeros", align_corners=False)[0]
    if flip[0]:
        out = out.flip(-1)
    if flip[1]:
        out = out.flip(-2)
    array = out.permute(1, 2, 0).numpy()
    assert size == array.shape[0]
    return Sample(np.ascontiguousarray(array[..., :3]), np.ascontiguousarray(array[..., 3:]))


def _blur(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return ndimage.uniform_filter(img, size=(max(1, img.shape[0] * 50 // 800), max(1, img.shape[1] * 50 // 800), 1))


def _gamma(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return 255.0 * (img / 255.0) ** rng.uniform(0.5, 2.0, size=3)


def _brightness(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return img * rng.uniform(0.75, 1.7) + rng.uniform(-50, 50)


def _hue_saturation(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    grey = img.mean(axis=-1, keepdims=True)
    return grey + (img - grey) * (1 + rng.uniform(-50, 50) / 100) + rng.uniform(-50, 50, size=3) * 0.5


def _autocontrast(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    low, high = img.min(axis=(0, 1)), img.max(axis=(0, 1))
    return (img - low) * 255.0 / np.maximum(high - low, 1e-6)


def _invert(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    flip = rng.random(3) < 0.05
    return np.where(flip, 255.0 - img, img)


def _elastic(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    alpha, sigma = rng.uniform(2.5, 7.5), 5.0
    dy = ndimage.gaussian_filter(rng.uniform(-1, 1, img.shape[:2]), sigma) * alpha
    dx = ndimage.gaussian_filter(rng.uniform(-1, 1, img.shape[:2]), sigma) * alpha
    rows, cols = np.meshgrid(np.arange(img.shape[0]), np.arange(img.shape[1]), indexing="ij")
    coords = [rows + dy, cols + dx]
    return np.stack([ndimage.map_coordinates(img[..., c], coords, order=1) for c in range(3)], axis=-1)


def _posterise(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Stand-in for imgaug's Cartoon: smoothed, quantised colours."""
    return np.round(ndimage.uniform_filter(img, size=(3, 3, 1)) / 32.0) * 32.0


COLOUR_AUGMENTERS = (_blur, _gamma, _brightness, _hue_saturation, _autocontrast, _elastic, _invert, _posterise)


def augment_colour(img: np.ndarray, rng: np.random.Generator, count: int = 3) -> np.ndarray:
    """``count`` distinct augmenters of the eight, drawn without replacement, applied in sequence."""
    for index in rng.choice(len(COLOUR_AUGMENTERS), size=count, replace=False):
        img = np.clip(COLOUR_AUGMENTERS[int(index)](img, rng), 0.0, 255.0)
    return img.astype(np.float32)


def paste_points(
    base: np.ndarray,
    source: np.ndarray,
    target_mask: np.ndarray,
    source_mask: np.ndarray,
    offset: float,
) -> np.ndarray:
    """``paste_point_cloud``: source relief re-centred on the base's points, + offset on every coordinate,
    then x and y taken back from the base where it has a point; source holes become (0, 0, 0) holes."""
    out = base.copy()
    src_rows = source[source_mask]
    tgt_idx = np.flatnonzero(target_mask.ravel())
    if src_rows.shape[0] != tgt_idx.size:
        raise ValueError("source and target masks must select the same number of pixels")
    src_valid = np.any(src_rows != 0, axis=-1)
    base_rows = base.reshape(-1, 3)[tgt_idx]
    base_valid = np.any(base_rows != 0, axis=-1)
    if not src_valid.any():
        return out
    centre_src = src_rows[src_valid].mean(axis=0)
    centre_base = base_rows[base_valid].mean(axis=0) if base_valid.any() else centre_src
    moved = src_rows - centre_src + centre_base + offset
    moved[:, :2] = np.where(base_valid[:, None], base_rows[:, :2], moved[:, :2])
    moved[~src_valid] = 0.0
    out.reshape(-1, 3)[tgt_idx] = moved
    return out


def shifted_masks(
    component: np.ndarray, foreground: np.ndarray, rng: np.random.Generator, full_bbox: bool
) -> tuple[np.ndarray, np.ndarray] | None:
    """(target mask, source mask) of ``shift_mask``: the component moved onto a random foreground pixel.

    The official bounding box excludes its last row and column (``full_bbox`` keeps them).
    """
    rows, cols = np.nonzero(component)
    top, left, bottom, right = rows.min(), cols.min(), rows.max() + int(full_bbox), cols.max() + int(full_bbox)
    source = np.zeros_like(component)
    source[top:bottom, left:right] = component[top:bottom, left:right]
    if not source.any():
        return None
    height, width = bottom - top, right - left
    cy, cx = int(np.rint(rows.mean())) - top, int(np.rint(cols.mean())) - left
    size = component.shape[0]
    fy, fx = np.nonzero(foreground)
    fits = (fy - cy >= 0) & (fy - cy + height <= size) & (fx - cx >= 0) & (fx - cx + width <= size)
    if not fits.any():
        return None
    pick = rng.choice(np.flatnonzero(fits))
    dy, dx = fy[pick] - cy - top, fx[pick] - cx - left
    target = np.zeros_like(component)
    sr, sc = np.nonzero(source)
    target[sr + dy, sc + dx] = True
    return target, source


def cut_paste(
    base: Sample,
    rgb_source: np.ndarray,
    xyz_source: np.ndarray,
    mask: np.ndarray,
    rng: np.random.Generator,
    z_offset: tuple[float, float],
    full_bbox: bool = False,
) -> tuple[Sample, np.ndarray]:
    """Paste every component of ``mask`` (``cut_paste_scc``); returns the new sample and the anomaly mask."""
    rgb, xyz = base.rgb.copy(), base.xyz.copy()
    foreground = base.foreground
    labels, count = ndimage.label(mask)
    min_area = max(1, round(MIN_PASTE_AREA * (mask.shape[0] / OFFICIAL_SIDE) ** 2))
    anomaly = np.zeros_like(mask, dtype=bool)
    for label in range(1, count + 1):
        component = labels == label
        if component.sum() <= min_area:
            continue
        offset = rng.uniform(*z_offset) * (1.0 if rng.standard_normal() >= 0 else -1.0)
        moved = (
            None
            if (component & foreground).sum() > 2 / 3 * component.sum()
            else shifted_masks(component, foreground, rng, full_bbox=full_bbox)
        )
        if moved is None:  # in place: blended colour
            ratio = rng.uniform(0.0, 0.5)
            rgb[component] = np.clip(ratio * rgb[component] + (1 - ratio) * rgb_source[component], 0, 255)
            xyz = paste_points(xyz, xyz_source, component, component, offset)
            anomaly |= component
        else:  # moved: hard copy of the colour
            target, source = moved
            rgb[target] = rgb_source[source]
            xyz = paste_points(xyz, xyz_source, target, source, offset)
            anomaly |= target
    return Sample(rgb, xyz), anomaly


def synthesise(
    base: Sample,
    rgb_source: Sample,
    xyz_source: np.ndarray,
    rng: np.random.Generator,
    *,
    fmt: str,
    category: str,
    z_offset: tuple[float, float] = (2e-4, 2e-3),
    keep_last_component: bool = False,
    full_bbox: bool = False,
    threshold: float = 0.4,
) -> tuple[Sample, np.ndarray] | None:
    """One pseudo-anomalous sample and its mask, or None when no mask fits (the caller draws another base)."""
    base = augment_geometry(base, base_augmentation(fmt, category), rng)
    source_rgb = augment_colour(rgb_source.rgb, rng)
    source_fg = np.any(xyz_source != 0, axis=-1)
    region = source_fg if fmt == "eyecandies" else source_fg & rgb_source.foreground
    mask = random_perlin_mask(
        region, rng, threshold=threshold, decay=fmt == "eyecandies", keep_last=keep_last_component
    )
    if mask is None:
        return None
    sample, anomaly = cut_paste(base, source_rgb, xyz_source, mask, rng, z_offset, full_bbox)
    if fmt == "eyecandies":  # zeroed outside the base's foreground after pasting
        keep = base.foreground
        sample = Sample(sample.rgb * keep[..., None], sample.xyz * keep[..., None])
        anomaly &= keep
    if not anomaly.any():
        return None
    return sample, anomaly
