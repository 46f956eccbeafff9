"""Reading and writing the files of the MVTec 3D-AD layout, with errors that name the file.

MVTec 3D-AD stores RGB as PNG, organized point clouds as H×W×3 float32 TIFF (invalid points are exact zeros) and
ground truth as 8-bit PNG whose non-zero values (255, or class ids 253–255 in the real data) mark defects.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from mmiad.data.errors import DataError


def read_rgb(path: str | Path) -> np.ndarray:
    """Read an image as H×W×3 uint8, converting grey or RGBA images to RGB."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError as error:
        raise DataError(path, "file not found") from error
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise DataError(path, f"unreadable or truncated image ({error})") from error
    return rgb


def read_xyz(path: str | Path) -> np.ndarray:
    """Read an organized point cloud TIFF as H×W×3 float32 with NaN/inf points set to zero (invalid)."""
    path = Path(path)
    try:
        xyz = tifffile.imread(path)
    except FileNotFoundError as error:
        raise DataError(path, "file not found") from error
    except Exception as error:  # tifffile raises many types for corrupt files
        raise DataError(path, f"unreadable or truncated TIFF ({type(error).__name__}: {error})") from error
    xyz = np.asarray(xyz)
    if xyz.ndim != 3 or xyz.shape[-1] != 3:
        raise DataError(path, f"expected an organized point cloud of shape H×W×3, got shape {xyz.shape}")
    if not np.issubdtype(xyz.dtype, np.floating):
        raise DataError(path, f"expected float coordinates in metres, got dtype {xyz.dtype}")
    xyz = xyz.astype(np.float32, copy=True)
    xyz[~np.isfinite(xyz).all(axis=-1)] = 0.0
    return xyz


def read_mask(path: str | Path) -> np.ndarray:
    """Read a ground-truth PNG as H×W bool: any value > 0 is anomalous (the real data uses class ids 253–255)."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            mask = np.asarray(image.convert("L"))
    except FileNotFoundError as error:
        raise DataError(path, "file not found") from error
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise DataError(path, f"unreadable or truncated mask ({error})") from error
    return mask > 0


def valid_points(xyz: np.ndarray) -> np.ndarray:
    """H×W bool of valid points. A point is valid when it is finite and not all-zero.

    The official code treats a point with *any* zero coordinate as invalid; a real point can have x == 0 exactly,
    so mmiad only drops points whose three coordinates are all zero.
    """
    return np.isfinite(xyz).all(axis=-1) & np.any(xyz != 0, axis=-1)


def write_rgb(path: str | Path, rgb: np.ndarray) -> None:
    """Write an H×W×3 uint8 image as PNG, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(rgb, dtype=np.uint8), mode="RGB").save(path)


def write_xyz(path: str | Path, xyz: np.ndarray) -> None:
    """Write an H×W×3 point cloud as float32 TIFF, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, np.asarray(xyz, dtype=np.float32), photometric="rgb")


def write_mask(path: str | Path, mask: np.ndarray) -> None:
    """Write a bool mask as an 8-bit PNG with 255 for anomalous pixels."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L").save(path)


def write_map(path: str | Path, anomaly_map: np.ndarray) -> None:
    """Write an anomaly map as a float32 TIFF (the format the official MVTec 3D-AD evaluation reads)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, np.asarray(anomaly_map, dtype=np.float32))


def read_map(path: str | Path) -> np.ndarray:
    """Read a float anomaly map written by :func:`write_map` (or any single-channel float TIFF)."""
    path = Path(path)
    try:
        anomaly_map = np.asarray(tifffile.imread(path), dtype=np.float32)
    except FileNotFoundError as error:
        raise DataError(path, "anomaly map not found") from error
    except Exception as error:
        raise DataError(path, f"unreadable anomaly map ({type(error).__name__}: {error})") from error
    anomaly_map = np.squeeze(anomaly_map)
    if anomaly_map.ndim != 2:
        raise DataError(path, f"expected a single-channel map, got shape {anomaly_map.shape}")
    return anomaly_map
