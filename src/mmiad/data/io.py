"""Reading and writing the files of the MVTec 3D-AD layout, with errors that name the file.

MVTec 3D-AD stores RGB as PNG, organized point clouds as H×W×3 float32 TIFF (invalid points are exact zeros) and
ground truth as 8-bit PNG whose non-zero values (255, or class ids 253–255 in the real data) mark defects.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from mmiad.data.errors import DataError
from mmiad.utils.atomic import write_with

# Limits checked from the file header, before any pixel is decoded: a 74-byte PNG may declare 30000×30000 pixels.
# 100 megapixels is above any industrial 3D camera (MVTec 3D-AD: 0.6 MP) and keeps one float32 xyz under 1.2 GB.
MAX_PIXELS = 100_000_000
# |coordinate| above this many metres is not a measurement; it is also what keeps the cleaning's DBSCAN cell grid
# (eps 6 mm) far from int64 overflow (1e3 m / 6 mm ≈ 1.7e5 cells per axis).
MAX_ABS_COORDINATE_M = 1e3


@contextmanager
def open_image(path: str | Path, what: str) -> Iterator[Image.Image]:
    """A Pillow image whose size was checked against :data:`MAX_PIXELS` before decoding; errors name the file.

    Pillow reads only the header on ``open``; decompression bombs (``DecompressionBombError``), truncated files
    and unknown formats all become a :class:`DataError` for that file.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            # Pillow warns above its own limit; the size is checked here against MAX_PIXELS instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(path)
        with opened as image:
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise DataError(
                    path, f"{what} declares {width}×{height} pixels, above the limit of {MAX_PIXELS:,} (not decoded)"
                )
            image.load()
            yield image
    except FileNotFoundError as error:
        raise DataError(path, "file not found") from error
    except Image.DecompressionBombError as error:
        raise DataError(path, f"{what} is too large to decode safely ({error})") from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        if isinstance(error, DataError):
            raise
        raise DataError(path, f"unreadable or truncated {what} ({error})") from error


def read_rgb(path: str | Path) -> np.ndarray:
    """Read an image as H×W×3 uint8, converting grey or RGBA images to RGB."""
    with open_image(path, "image") as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _tiff_header_check(path: Path) -> None:
    """Shape and dtype of the first TIFF series from its header, before the data is decoded."""
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0] if tif.series else None
        if series is None:
            raise DataError(path, "the TIFF holds no image")
        shape, dtype = tuple(series.shape), np.dtype(series.dtype)
    if len(shape) != 3 or shape[-1] != 3:
        raise DataError(path, f"expected an organized point cloud of shape H×W×3, got shape {shape}")
    if shape[0] * shape[1] > MAX_PIXELS:
        raise DataError(path, f"point cloud of {shape[1]}×{shape[0]} points is above the limit of {MAX_PIXELS:,}")
    if not np.issubdtype(dtype, np.floating):
        raise DataError(path, f"expected float coordinates in metres, got dtype {dtype}")


def read_xyz(path: str | Path) -> np.ndarray:
    """Read an organized point cloud TIFF as H×W×3 float32 with NaN/inf points set to zero (invalid)."""
    path = Path(path)
    try:
        _tiff_header_check(path)
        xyz = tifffile.imread(path)
    except FileNotFoundError as error:
        raise DataError(path, "file not found") from error
    except DataError:
        raise
    except Exception as error:  # tifffile raises many types for corrupt files
        raise DataError(path, f"unreadable or truncated TIFF ({type(error).__name__}: {error})") from error
    xyz = np.asarray(xyz)
    if xyz.ndim != 3 or xyz.shape[-1] != 3:
        raise DataError(path, f"expected an organized point cloud of shape H×W×3, got shape {xyz.shape}")
    if not np.issubdtype(xyz.dtype, np.floating):
        raise DataError(path, f"expected float coordinates in metres, got dtype {xyz.dtype}")
    check_coordinates(path, xyz)
    xyz = xyz.astype(np.float32, copy=True)
    xyz[~np.isfinite(xyz).all(axis=-1)] = 0.0
    return xyz


def check_coordinates(path: str | Path, xyz: np.ndarray) -> None:
    """Finite coordinates must lie within :data:`MAX_ABS_COORDINATE_M` (non-finite points are invalid, not errors).

    Raises:
        DataError: naming the file, for a cloud no sensor measured (1e19 m) that would overflow later stages.
    """
    with np.errstate(invalid="ignore", over="ignore"):
        absurd = np.isfinite(xyz) & (np.abs(xyz) > MAX_ABS_COORDINATE_M)
    if absurd.any():
        worst = float(np.abs(xyz[absurd]).max())
        raise DataError(
            path, f"coordinates up to {worst:.3g} m; |coordinate| must be at most {MAX_ABS_COORDINATE_M:g} m"
        )


def read_mask(path: str | Path) -> np.ndarray:
    """Read a ground-truth PNG as H×W bool: any value > 0 is anomalous (the real data uses class ids 253–255)."""
    with open_image(path, "mask") as image:
        return np.asarray(image.convert("L")) > 0


def valid_points(xyz: np.ndarray) -> np.ndarray:
    """H×W bool of valid points. A point is valid when it is finite and not all-zero.

    The official code treats a point with *any* zero coordinate as invalid; a real point can have x == 0 exactly,
    so mmiad only drops points whose three coordinates are all zero.
    """
    return np.isfinite(xyz).all(axis=-1) & np.any(xyz != 0, axis=-1)


def write_rgb(path: str | Path, rgb: np.ndarray) -> None:
    """Write an H×W×3 uint8 image as PNG, creating parent folders."""
    image = Image.fromarray(np.asarray(rgb, dtype=np.uint8), mode="RGB")
    write_with(path, image.save)


def write_xyz(path: str | Path, xyz: np.ndarray) -> None:
    """Write an H×W×3 point cloud as float32 TIFF, creating parent folders."""
    write_with(path, lambda temp: tifffile.imwrite(temp, np.asarray(xyz, dtype=np.float32), photometric="rgb"))


def write_mask(path: str | Path, mask: np.ndarray) -> None:
    """Write a bool mask as an 8-bit PNG with 255 for anomalous pixels."""
    image = Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L")
    write_with(path, image.save)


def write_map(path: str | Path, anomaly_map: np.ndarray) -> None:
    """Write an anomaly map as a float32 TIFF (the format the official MVTec 3D-AD evaluation reads)."""
    write_with(path, lambda temp: tifffile.imwrite(temp, np.asarray(anomaly_map, dtype=np.float32)))


def read_map(path: str | Path) -> np.ndarray:
    """Read a float anomaly map written by :func:`write_map` (or any single-channel float TIFF)."""
    path = Path(path)
    try:
        with tifffile.TiffFile(path) as tif:
            shape = tuple(tif.series[0].shape) if tif.series else ()
        if int(np.prod(shape, dtype=np.float64)) > MAX_PIXELS:
            raise DataError(path, f"anomaly map of shape {shape} is above the limit of {MAX_PIXELS:,} values")
        anomaly_map = np.asarray(tifffile.imread(path), dtype=np.float32)
    except FileNotFoundError as error:
        raise DataError(path, "anomaly map not found") from error
    except DataError:
        raise
    except Exception as error:
        raise DataError(path, f"unreadable anomaly map ({type(error).__name__}: {error})") from error
    anomaly_map = np.squeeze(anomaly_map)
    if anomaly_map.ndim != 2:
        raise DataError(path, f"expected a single-channel map, got shape {anomaly_map.shape}")
    if not np.isfinite(anomaly_map).all():
        raise DataError(path, "the anomaly map holds NaN or infinite values")
    return anomaly_map
