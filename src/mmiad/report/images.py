"""Small pictures and point clouds for the report, embedded in the page so it opens anywhere without a server.

Every picture is shrunk to a thumbnail before it is kept, because a report holds a few dozen samples per category
and only its thumbnails and subsampled clouds may live until the page is written.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from mmiad.data.preprocess import IMAGENET_MEAN, IMAGENET_STD
from mmiad.postprocess.outputs import colorize, overlay

DEFAULT_THUMB = 160
DEFAULT_POINTS = 20_000


def unnormalize_rgb(rgb: Any) -> np.ndarray:
    """(3, S, S) ImageNet-normalised tensor or array → (S, S, 3) uint8, inverting the model's input transform."""
    array = rgb.detach().cpu().numpy() if hasattr(rgb, "detach") else np.asarray(rgb)
    if array.ndim != 3 or array.shape[0] != 3:
        raise ValueError(f"expected a (3, S, S) normalised image, got shape {array.shape}")
    mean = np.asarray(IMAGENET_MEAN, np.float32)[:, None, None]
    std = np.asarray(IMAGENET_STD, np.float32)[:, None, None]
    pixels = (array.astype(np.float32) * std + mean) * 255.0
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8).transpose(1, 2, 0)


def depth_image(xyz: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Grey image of z: the valid points' range stretched to 1..255, invalid points black.

    The 1st–99th percentiles set the range so a few outliers (sensor spikes) do not flatten the whole picture.
    """
    xyz = np.asarray(xyz, np.float32)
    if xyz.ndim != 3 or xyz.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) point cloud, got shape {xyz.shape}")
    z = xyz[..., 2]
    mask = np.any(xyz != 0, axis=2) if valid is None else np.asarray(valid, bool)
    grey = np.zeros(z.shape, np.uint8)
    if mask.any():
        low, high = np.percentile(z[mask], [1, 99])
        scaled = (z - low) / max(float(high - low), 1e-12)
        grey[mask] = (1 + np.clip(scaled[mask], 0.0, 1.0) * 254).astype(np.uint8)
    return grey


def mask_image(mask: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray:
    """Ground truth as white on black (all black when there is none, as for a good sample)."""
    if mask is None:
        return np.zeros(shape, np.uint8)
    return np.where(np.asarray(mask, bool), 255, 0).astype(np.uint8)


def heat_image(values: np.ndarray) -> tuple[np.ndarray, float, float]:
    """A map stretched to its own range and coloured: (RGB, low, high), since each modality has its own scale."""
    values = np.asarray(values, np.float32)
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    scaled = (np.nan_to_num(values, nan=low) - low) / max(high - low, 1e-12)
    return colorize(scaled), low, high


def overlay_image(rgb: np.ndarray, anomaly_map: np.ndarray, scale: float) -> np.ndarray:
    """The final map over the image (``scale`` = full red), the same blend ``mmiad predict`` writes."""
    if anomaly_map.shape != rgb.shape[:2]:
        anomaly_map = np.asarray(Image.fromarray(anomaly_map.astype(np.float32)).resize(rgb.shape[1::-1]))
    return overlay(rgb, anomaly_map, scale)


def thumbnail(image: np.ndarray, size: int = DEFAULT_THUMB) -> np.ndarray:
    """Shrink so the longer side is at most ``size`` (never enlarge: the browser scales small pictures up)."""
    if size < 1:
        raise ValueError(f"thumbnail size must be positive, got {size}")
    height, width = image.shape[:2]
    if max(height, width) <= size:
        return image
    factor = size / max(height, width)
    target = (max(1, round(width * factor)), max(1, round(height * factor)))
    return np.asarray(Image.fromarray(image).resize(target, Image.Resampling.BILINEAR))


def png_data_uri(image: np.ndarray) -> str:
    """A ``data:image/png;base64,...`` URI, so the page needs no image files beside it."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


@dataclass
class Cloud:
    """A subsampled point cloud ready for the page's viewer.

    Positions are quantised to uint16 inside the bounding box (6 bytes a point instead of 12) and scores to one
    byte (an index into the colour ramp), both little-endian base64, because the browser decodes them straight into
    typed arrays.

    Attributes:
        positions: base64 of n×3 uint16, x/y/z quantised from ``low``..``high``.
        colors: base64 of n uint8 ramp indices (0 = cold, 255 = at or above the overlay's full-red scale).
        low: Bounding-box minimum (x, y, z).
        high: Bounding-box maximum (x, y, z).
        count: Number of points.
    """

    positions: str
    colors: str
    low: list[float]
    high: list[float]
    count: int

    def to_json(self) -> dict[str, Any]:
        """Fields for the viewer's JSON."""
        return dict(self.__dict__)


def make_cloud(
    xyz: np.ndarray, scores: np.ndarray, valid: np.ndarray | None, scale: float, max_points: int = DEFAULT_POINTS
) -> Cloud | None:
    """Subsample the valid points (a seeded draw, so reports are reproducible) and encode them; None if none."""
    xyz = np.asarray(xyz, np.float32)
    scores = np.asarray(scores, np.float32)
    if xyz.shape[:2] != scores.shape:
        raise ValueError(f"point cloud {xyz.shape[:2]} and anomaly map {scores.shape} differ in size")
    mask = np.any(xyz != 0, axis=2) if valid is None else np.asarray(valid, bool) & np.any(xyz != 0, axis=2)
    points, values = xyz[mask], scores[mask]
    if points.shape[0] == 0 or max_points < 1:
        return None
    if points.shape[0] > max_points:
        keep = np.sort(np.random.default_rng(0).choice(points.shape[0], size=max_points, replace=False))
        points, values = points[keep], values[keep]
    low, high = points.min(axis=0), points.max(axis=0)
    quantised = np.rint((points - low) / np.maximum(high - low, 1e-12) * 65535).astype("<u2")
    colors = np.rint(np.clip(np.nan_to_num(values) / max(scale, 1e-12), 0.0, 1.0) * 255).astype(np.uint8)
    return Cloud(
        positions=base64.b64encode(quantised.tobytes()).decode("ascii"),
        colors=base64.b64encode(colors.tobytes()).decode("ascii"),
        low=[float(v) for v in low],
        high=[float(v) for v in high],
        count=int(points.shape[0]),
    )


def ramp_colors(steps: int = 256) -> list[list[int]]:
    """The heat ramp sampled at ``steps`` levels, so the viewer colours points exactly like the overlays."""
    return colorize(np.linspace(0.0, 1.0, steps, dtype=np.float32)).tolist()
