"""Online transforms: from a (cleaned) sample at its original size to the square model input, and back.

Every official method feeds 224×224 inputs: the sample is padded to a square (the official offline step pads the
TIFF to the larger side rounded up to a multiple of 100), the RGB is resized bicubically with PIL and normalised
with the ImageNet statistics, the point cloud is resized with PyTorch's *legacy* ``nearest`` (floor indexing, so
no coordinates are ever mixed), and the ground truth with PIL nearest. :func:`map_to_original` undoes the geometry
so anomaly maps can be written at the ground truth's resolution, which the official MVTec 3D-AD evaluation reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mmiad.data.io import valid_points
from mmiad.data.sample import Sample, SampleRecord

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PAD_MODES = ("edge", "constant")


@dataclass(frozen=True)
class PadGeometry:
    """Where the original image sits on the square canvas.

    Attributes:
        original_size: (height, width) of the sample.
        padded_size: Side L of the square canvas.
        pad: (top, left) padding; the bottom and right get the remainder.
    """

    original_size: tuple[int, int]
    padded_size: int
    pad: tuple[int, int]


def square_geometry(height: int, width: int, pad_multiple: int = 100) -> PadGeometry:
    """Canvas of side ``max(ceil(h/m)·m, ceil(w/m)·m)`` with the image centred (top/left get the smaller half)."""
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}×{width}")
    if pad_multiple < 1:
        raise ValueError(f"pad_multiple must be at least 1, got {pad_multiple}")
    side = max(-(-height // pad_multiple) * pad_multiple, -(-width // pad_multiple) * pad_multiple)
    return PadGeometry((height, width), side, ((side - height) // 2, (side - width) // 2))


def pad_to_square(
    array: np.ndarray, *, pad_multiple: int = 100, mode: str = "constant"
) -> tuple[np.ndarray, PadGeometry]:
    """Pad an (H, W) or (H, W, C) array onto its square canvas.

    Args:
        array: Image, mask or organized point cloud.
        pad_multiple: Canvas side granularity (100 as in the official ``pad_cropped_pc``).
        mode: ``constant`` (zeros: point clouds, masks, M3DM's RGB) or ``edge`` (CFM's SquarePad for RGB).

    Returns:
        The padded array and its geometry.
    """
    if mode not in PAD_MODES:
        raise ValueError(f"pad mode must be one of {PAD_MODES}, got {mode!r}")
    array = np.asarray(array)
    if array.ndim not in (2, 3):
        raise ValueError(f"expected an (H, W) or (H, W, C) array, got shape {array.shape}")
    geometry = square_geometry(array.shape[0], array.shape[1], pad_multiple)
    (top, left), side = geometry.pad, geometry.padded_size
    widths = [(top, side - top - array.shape[0]), (left, side - left - array.shape[1])]
    widths += [(0, 0)] * (array.ndim - 2)
    return np.pad(array, widths, mode=cast(Any, mode)), geometry


def _legacy_nearest_index(in_size: int, out_size: int) -> np.ndarray:
    """Source indices of PyTorch's legacy ``nearest``: ``floor(dst · (in/out))`` in float32, clamped.

    PyTorch special-cases equal sizes and exact 2× upsampling, and otherwise computes the scale and the product in
    single precision; doing the same keeps the result identical for every size pair.
    """
    if out_size == in_size:
        return np.arange(out_size)
    if out_size == 2 * in_size:
        return np.arange(out_size) >> 1
    scale = np.float32(in_size) / np.float32(out_size)
    index = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(index, in_size - 1)


def resize_xyz_nearest(xyz: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize an (H, W) or (H, W, C) array like ``F.interpolate(mode="nearest")`` (legacy floor indexing)."""
    xyz = np.asarray(xyz)
    if xyz.ndim not in (2, 3):
        raise ValueError(f"expected an (H, W) or (H, W, C) array, got shape {xyz.shape}")
    out_h, out_w = (size, size) if isinstance(size, int) else size
    if out_h < 1 or out_w < 1:
        raise ValueError(f"output size must be positive, got {out_h}×{out_w}")
    rows = _legacy_nearest_index(xyz.shape[0], out_h)
    cols = _legacy_nearest_index(xyz.shape[1], out_w)
    return xyz[rows[:, None], cols[None, :]]


def rgb_to_tensor(rgb: np.ndarray, size: int) -> torch.Tensor:
    """PIL bicubic resize to size×size, scale to [0, 1] and ImageNet-normalise: a (3, S, S) float32 tensor."""
    image = Image.fromarray(np.asarray(rgb, dtype=np.uint8), mode="RGB").resize((size, size), Image.Resampling.BICUBIC)
    scaled = np.asarray(image, dtype=np.float32) / np.float32(255.0)
    normalised = (scaled - np.asarray(IMAGENET_MEAN, dtype=np.float32)) / np.asarray(IMAGENET_STD, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(normalised.transpose(2, 0, 1)))


def resize_mask_nearest(mask: np.ndarray, size: int) -> np.ndarray:
    """PIL NEAREST resize of a bool mask to size×size (as the official GT transform), back to bool."""
    image = Image.fromarray(np.where(np.asarray(mask, dtype=bool), 255, 0).astype(np.uint8), mode="L")
    return np.asarray(image.resize((size, size), Image.Resampling.NEAREST)) > 0


@dataclass
class ModelInput:
    """One sample ready for a model, with what is needed to map its outputs back.

    Attributes:
        rgb: (3, S, S) float32 tensor, ImageNet-normalised.
        xyz: (S, S, 3) float32 organized point cloud (zeros are invalid).
        valid: (S, S) bool, the non-zero points after resizing.
        gt_mask: (S, S) bool or None.
        label: 0 nominal, 1 anomalous, -1 unknown.
        original_size: (height, width) of the sample.
        padded_size: Side L of the square canvas before resizing.
        pad: (top, left) padding on that canvas.
        record: Where the sample came from.
        source_rgb: The original H×W×3 RGB when the caller asked to keep it (``mmiad predict`` draws its overlays
            on it instead of decoding the file again), else None.
    """

    rgb: torch.Tensor
    xyz: np.ndarray
    valid: np.ndarray
    gt_mask: np.ndarray | None
    label: int
    original_size: tuple[int, int]
    padded_size: int
    pad: tuple[int, int]
    record: SampleRecord | None = None
    source_rgb: np.ndarray | None = None

    @property
    def geometry(self) -> PadGeometry:
        """The padding geometry, for :func:`map_to_original`."""
        return PadGeometry(self.original_size, self.padded_size, self.pad)


def prepare_input(
    sample: Sample, *, size: int = 224, rgb_pad_mode: str = "edge", pad_multiple: int = 100
) -> ModelInput:
    """Pad a sample to its square canvas and resize every modality to size×size.

    Points marked invalid in ``sample.valid`` are zeroed first so the resized cloud's zeros mean "invalid".

    Args:
        sample: A (usually preprocessed) sample at its original resolution.
        size: Model input side (224 for every official method).
        rgb_pad_mode: ``edge`` for CFM/Uni-RCM, ``constant`` for M3DM/BTF (their padded RGB has black borders).
        pad_multiple: Canvas side granularity.
    """
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    xyz = np.where(np.asarray(sample.valid, dtype=bool)[..., None], sample.xyz, 0).astype(np.float32)
    xyz, geometry = pad_to_square(xyz, pad_multiple=pad_multiple, mode="constant")
    rgb, _ = pad_to_square(sample.rgb, pad_multiple=pad_multiple, mode=rgb_pad_mode)
    xyz = resize_xyz_nearest(xyz, size)
    gt_mask = None
    if sample.gt_mask is not None:
        padded_gt, _ = pad_to_square(np.asarray(sample.gt_mask, dtype=bool), pad_multiple=pad_multiple)
        gt_mask = resize_mask_nearest(padded_gt, size)
    return ModelInput(
        rgb=rgb_to_tensor(rgb, size),
        xyz=np.ascontiguousarray(xyz),
        valid=valid_points(xyz),
        gt_mask=gt_mask,
        label=sample.label,
        original_size=geometry.original_size,
        padded_size=geometry.padded_size,
        pad=geometry.pad,
        record=sample.record,
    )


def map_to_original(anomaly_map: np.ndarray, geometry: ModelInput | PadGeometry) -> np.ndarray:
    """Bring a model-resolution map back to the sample's original (height, width).

    Bilinear resize (``align_corners=False``, as the methods upsample their maps) to the square canvas, then crop
    the padding away.

    Returns:
        (height, width) float32 map.
    """
    if isinstance(geometry, ModelInput):
        geometry = geometry.geometry
    anomaly_map = np.asarray(anomaly_map, dtype=np.float32)
    if anomaly_map.ndim != 2:
        raise ValueError(f"expected a 2-D anomaly map, got shape {anomaly_map.shape}")
    side = geometry.padded_size
    tensor = torch.from_numpy(np.ascontiguousarray(anomaly_map))[None, None]
    canvas = F.interpolate(tensor, size=(side, side), mode="bilinear", align_corners=False)[0, 0].numpy()
    (top, left), (height, width) = geometry.pad, geometry.original_size
    return np.ascontiguousarray(canvas[top : top + height, left : left + width])
