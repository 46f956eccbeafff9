"""Write synthetic samples in the native Eyecandies layout, so the whole Eyecandies path runs without the dataset.

Eyecandies stores a rendered depth PNG (16-bit, normalised over ``[min, max]`` of ``info_depth.yaml``), the camera
``pose.txt`` and the RGB ``image_4.png`` per sample; the reader (:mod:`mmiad.data.eyecandies`) back-projects the
depth with the dataset's fixed camera (focal length 711.11 px, principal point at the image centre), maps it to
the world with the inverse pose, drops the background with the official heuristic and reorders the axes.

A synthetic sample is written so that this reader finds its object:

* depth is the synthetic camera's ``z`` scaled by :data:`DEPTH_SCALE` (the heuristic's 2 cm height threshold and
  1.8 / 1.0 extents are tuned to Eyecandies' scene units, a few times larger than the synthetic metres); invalid
  points are written as depth 0, which the reader treats as missing;
* the pose is chosen so that the background plane, as the reader will back-project it, is perpendicular to the
  world ``z`` axis: the heuristic then measures heights straight above the plane, as on real Eyecandies scenes.

The reader's camera differs from the synthetic one (711.11 px at any size), so the clouds are a laterally
squeezed version of the MVTec-layout set's. This layout exists to exercise the Eyecandies path end to end, not
to compare numbers between the two layouts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from mmiad.data.eyecandies import DEPTH_PNG_MAX, FOCAL_LENGTH, RGB_ITEM
from mmiad.data.io import write_mask, write_rgb
from mmiad.data.synthetic.scene import Synthesized

DEPTH_SCALE = 8.0
"""Eyecandies scene units per synthetic metre: objects (1-3 cm tall) stand well clear of the 2 cm threshold."""

BORDER = 10
"""Width of the border strips the plane is fitted on (the synthetic objects never reach them)."""

SPLIT_FOLDERS = {"train": "train", "validation": "val", "test": "test_public", "predict": "test_private"}
"""mmiad's split names mapped to Eyecandies' folders (the same mapping as the reader's)."""


def _filled_depth(xyz: np.ndarray) -> np.ndarray:
    """Synthetic depth in scene units with invalid pixels at 0, except the two anchor pixels of the background
    heuristic (top- and bottom-centre), which are filled from their nearest valid neighbour."""
    depth = np.where(np.isfinite(xyz[..., 2]) & (xyz[..., 2] > 0), xyz[..., 2], 0.0) * DEPTH_SCALE
    height, width = depth.shape
    anchors = [(0, width // 2), (height - 1, width // 2)]
    if any(depth[a] == 0 for a in anchors):
        _, (rows, cols) = ndimage.distance_transform_edt(depth == 0, return_indices=True)
        for anchor in anchors:
            depth[anchor] = depth[rows[anchor], cols[anchor]]
    return depth


def _reader_camera_points(depth: np.ndarray) -> np.ndarray:
    """What the reader back-projects before applying the pose (H×W×3, camera frame)."""
    height, width = depth.shape
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float64)
    return np.stack(
        [depth * (cols - width / 2) / FOCAL_LENGTH, depth * (rows - height / 2) / FOCAL_LENGTH, depth], axis=-1
    )


def _rotation_onto_z(normal: np.ndarray) -> np.ndarray:
    """The rotation taking the unit vector ``normal`` onto ``(0, 0, -1)`` (Rodrigues; identity when aligned)."""
    target = np.array([0.0, 0.0, -1.0])
    normal = normal / np.linalg.norm(normal)
    if normal @ target < 0:
        normal = -normal
    axis = np.cross(normal, target)
    sin, cos = np.linalg.norm(axis), float(normal @ target)
    if sin < 1e-12:
        return np.eye(3)
    k = axis / sin
    skew = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + sin * skew + (1 - cos) * skew @ skew


def eyecandies_pose(depth: np.ndarray) -> np.ndarray:
    """The 4×4 ``pose.txt`` that makes the back-projected background plane perpendicular to the world z axis.

    The plane is fitted (least squares, SVD) to the valid points of the border strips as the reader will
    back-project them; the reader applies ``inv(pose)``, so the pose is the inverse of that levelling rotation.
    """
    points = _reader_camera_points(depth)
    border = np.zeros(depth.shape, bool)
    border[:BORDER], border[-BORDER:], border[:, :BORDER], border[:, -BORDER:] = True, True, True, True
    strip = points[border & (depth > 0)]
    if len(strip) < 3:
        raise ValueError("too few valid border points to fit the background plane")
    centred = strip - strip.mean(axis=0)
    normal = np.linalg.svd(centred, full_matrices=False)[2][-1]
    levelling = np.eye(4)
    levelling[:3, :3] = _rotation_onto_z(normal)
    return np.linalg.inv(levelling)


def write_eyecandies_sample(data_dir: Path, index: str, generated: Synthesized, *, with_mask: bool) -> None:
    """Write one sample's ``image_4.png``, ``depth.png``, ``info_depth.yaml``, ``pose.txt`` (and ``mask.png``)."""
    depth = _filled_depth(generated.sample.xyz)
    depth_max = float(depth.max()) * 1.02
    quantized = np.round(depth / depth_max * DEPTH_PNG_MAX).astype(np.uint16)
    stored_depth = quantized.astype(np.float64) / DEPTH_PNG_MAX * depth_max
    data_dir.mkdir(parents=True, exist_ok=True)
    write_rgb(data_dir / f"{index}_{RGB_ITEM}.png", generated.sample.rgb)
    Image.fromarray(quantized).save(data_dir / f"{index}_depth.png")
    (data_dir / f"{index}_info_depth.yaml").write_text(f"normalization:\n  max: {depth_max!r}\n  min: 0.0\n")
    np.savetxt(data_dir / f"{index}_pose.txt", eyecandies_pose(stored_depth))
    if with_mask:
        mask = generated.gt_mask if generated.gt_mask is not None else np.zeros(depth.shape, bool)
        write_mask(data_dir / f"{index}_mask.png", mask)
