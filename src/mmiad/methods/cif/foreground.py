"""CIF's foreground rules: which patches are the object, so only they are clustered, stored and scored.

CIF never learns a background model: background patches are kept out of the memory and score exactly 0. The
official code decides the foreground per dataset (``utils/foreground_extractor.py`` and the dataset classes):

- ``corner_plane`` (MVTec 3D-AD, *raw* clouds): the depth (Z) is compared with the bilinear surface through the
  mean depths of the four 2×2 image corners, after 3 gap-filling passes; a pixel is foreground when it is more
  than 7e-3 off that surface and has a depth. Needs the background in the cloud: plane-removed clouds have empty
  corners, which the official code turns into NaN and an empty mask.
- ``z_positive`` (Eyecandies, MVTec-format preprocessed clouds): the Z channel itself, positive after resizing.
- ``valid`` (ours): the valid-point mask, for clouds whose background was already removed (``cfm``/``m3dm``
  profiles, other background-removed formats), where ``corner_plane`` cannot work.

``auto`` picks ``corner_plane`` for raw clouds and ``valid`` otherwise, from the record's dataset format and the
preprocessing profile (:func:`resolve_rule`). Every
rule is computed on the model input (S×S, nearest-resized, inside the image's footprint on the padded canvas) and
brought to the patch grid by a bilinear resize without antialiasing, as the official ``F.interpolate`` does.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from mmiad.data.formats import get_format
from mmiad.data.preprocess import ModelInput

FOREGROUND_RULES = ("auto", "corner_plane", "z_positive", "valid")


def resolve_rule(rule: str, record_format: str, plane_removed: bool) -> str:
    """The concrete rule for a sample: ``rule`` itself unless it is ``auto``.

    ``auto``: a format whose reader removes the background (Eyecandies) or a profile that removes the plane →
    ``valid`` (the corners are empty there, and mmiad's Eyecandies reader writes the background as exact zeros);
    otherwise (raw clouds, the official MVTec 3D-AD setting) → ``corner_plane``. The official Eyecandies rule,
    ``z_positive``, is not the automatic choice: on mmiad's reader object points can have Z ≤ 0 (the synthetic
    Eyecandies layout has whole objects below 0), which would leave the mask empty; it stays available by name.
    """
    if rule not in FOREGROUND_RULES:
        raise ValueError(f"unknown foreground rule {rule!r}; expected one of {FOREGROUND_RULES}")
    if rule != "auto":
        return rule
    try:
        removed = get_format(record_format).background_removed
    except ValueError:
        removed = False
    return "valid" if removed or plane_removed else "corner_plane"


def _neighbourhood_sum(values: np.ndarray) -> np.ndarray:
    """3×3 sums with zero padding (``scipy.ndimage.convolve(mode="constant")`` with a ones kernel)."""
    padded = np.pad(values, 1)
    height, width = values.shape
    total = np.zeros_like(values)
    for r in range(3):
        for c in range(3):
            total += padded[r : r + height, c : c + width]
    return total


def fill_gaps(depth: np.ndarray) -> np.ndarray:
    """One gap-filling pass: each zero pixel with a positive 3×3 neighbour takes the mean of its positive neighbours.

    The pass reads the image as it was before it (a simultaneous update), as the official ``fill_gaps``.
    """
    positive = (depth > 0).astype(depth.dtype)
    count = _neighbourhood_sum(positive)
    total = _neighbourhood_sum(depth * positive)
    filled = depth.copy()
    gaps = (depth == 0) & (count > 0)
    filled[gaps] = total[gaps] / count[gaps]
    return filled


def corner_plane_mask(depth: np.ndarray, threshold: float = 7e-3, fills: int = 3) -> np.ndarray:
    """H×W bool foreground of the official MVTec 3D-AD rule on a depth (Z) image.

    1. Depths outside [0, 1] are min-max normalised over the whole image (zeros included), as the official
       dataset class does; metric MVTec depths (about 0.5-0.9 m) are left as they are.
    2. ``fills`` gap-filling passes (:func:`fill_gaps`).
    3. The background surface is the bilinear interpolation of the mean positive depth of each 2×2 corner.
    4. Foreground: more than ``threshold`` off that surface, and a non-zero (filled) depth.

    A 2×2 corner with no positive depth left (a sensor dropout larger than the fills) makes the official surface
    NaN and the mask empty, and the official run then crashes in K-means. Here that corner's window grows (3×3,
    4×4, ... up to half the image) until it holds a depth (:func:`_corner_mean`); only a quadrant without any depth
    gives an empty mask (the caller then falls back, see :func:`foreground_grid`).
    """
    d = np.asarray(depth, dtype=np.float64)
    if d.ndim != 2 or min(d.shape) < 2:
        raise ValueError(f"expected a 2-D depth image of at least 2×2, got shape {d.shape}")
    low, high = float(d.min()), float(d.max())
    if high > 1 or low < 0:
        if high == low:
            return np.zeros(d.shape, dtype=bool)
        d = (d - low) / (high - low)
    for _ in range(fills):
        d = fill_gaps(d)
    means = [mean for mean in (_corner_mean(d, corner) for corner in range(4)) if mean is not None]
    if len(means) < 4:
        return np.zeros(d.shape, dtype=bool)
    top_left, top_right, bottom_left, bottom_right = means
    u = np.linspace(0.0, 1.0, d.shape[0])[:, None]  # down the rows
    v = np.linspace(0.0, 1.0, d.shape[1])[None, :]  # across the columns
    surface = (top_left * (1 - u) + bottom_left * u) * (1 - v) + (top_right * (1 - u) + bottom_right * u) * v
    return (np.abs(surface - d) > threshold) & (d != 0)


def _corner_mean(depth: np.ndarray, corner: int) -> float | None:
    """Mean positive depth of the smallest square window (2×2 first, the official size) at a corner that has one.

    Corners in the order top-left, top-right, bottom-left, bottom-right; None when even the half-image window has
    no positive depth.
    """
    height, width = depth.shape
    for side in range(2, max(2, min(height, width) // 2) + 1):
        rows = slice(0, side) if corner < 2 else slice(height - side, height)
        cols = slice(0, side) if corner % 2 == 0 else slice(width - side, width)
        window = depth[rows, cols]
        positive = window > 0
        if positive.any():
            return float(window[positive].sum() / positive.sum())
    return None


def to_grid(values: np.ndarray, grid: int) -> torch.Tensor:
    """grid×grid float64 bilinear resize (align_corners=False, no antialias) of an S×S map, as the official code."""
    tensor = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64))[None, None]
    return F.interpolate(tensor, size=(grid, grid), mode="bilinear", align_corners=False)[0, 0]


def footprint(inputs: ModelInput) -> tuple[slice, slice]:
    """Rows and columns of the model input covered by the image (not by the square canvas's zero padding)."""
    size = int(inputs.xyz.shape[0])
    scale = size / inputs.padded_size
    (top, left), (height, width) = inputs.pad, inputs.original_size
    rows = slice(round(top * scale), max(round(top * scale) + 2, round((top + height) * scale)))
    cols = slice(round(left * scale), max(round(left * scale) + 2, round((left + width) * scale)))
    return rows, cols


def foreground_grid(
    inputs: ModelInput, rule: str, grid: int, *, threshold: float = 7e-3, fills: int = 3
) -> torch.Tensor:
    """grid×grid bool foreground of one sample under a concrete rule (not ``auto``).

    ``corner_plane`` and ``valid`` resize the S×S 0/1 mask and keep ≥ 0.5; ``z_positive`` resizes the Z channel
    and keeps > 0. When a rule finds no foreground patch at all (an undefined corner surface, an empty cloud) every
    patch counts as foreground: the official code crashes there (K-means on 0 samples), and scoring the whole image
    against the nominal object keeps a sample without a visible object from passing as good.
    """
    if rule == "z_positive":
        mask = to_grid(np.asarray(inputs.xyz[..., 2], dtype=np.float64), grid) > 0
    elif rule in ("corner_plane", "valid"):
        if rule == "valid":
            full = np.asarray(inputs.valid, dtype=bool)
        else:
            rows, cols = footprint(inputs)
            full = np.zeros(inputs.xyz.shape[:2], dtype=bool)
            full[rows, cols] = corner_plane_mask(inputs.xyz[rows, cols, 2], threshold, fills)
        mask = to_grid(full.astype(np.float64), grid) >= 0.5
    else:
        raise ValueError(f"unknown concrete foreground rule {rule!r}")
    if not bool(mask.any()):
        mask = torch.ones(grid, grid, dtype=torch.bool)
    return mask
