"""Preprocessing faithful to the official CFM / M3DM / BTF / Uni-RCM code.

Offline (per sample, original resolution, cached on disk): :func:`remove_background_plane` and
:func:`keep_largest_cluster`, combined by a named :class:`PreprocessProfile` in :func:`preprocess_sample` and run
over a dataset into the cache by :func:`preprocess_dataset`. Online (model input): :func:`prepare_input` pads to a
square and resizes every modality; :func:`map_to_original` maps an anomaly map back to the original resolution.
"""

from __future__ import annotations

from mmiad.data.preprocess.cache import default_cache_root, preprocess_dataset, profile_cache_dir, source_key
from mmiad.data.preprocess.cluster import dbscan_labels, keep_largest_cluster
from mmiad.data.preprocess.plane import fit_plane_ransac, remove_background_plane
from mmiad.data.preprocess.profiles import PROFILES, PreprocessProfile, get_profile, preprocess_sample
from mmiad.data.preprocess.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ModelInput,
    PadGeometry,
    map_to_original,
    pad_to_square,
    prepare_input,
    resize_mask_nearest,
    resize_xyz_nearest,
    rgb_to_tensor,
    square_geometry,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PROFILES",
    "ModelInput",
    "PadGeometry",
    "PreprocessProfile",
    "dbscan_labels",
    "default_cache_root",
    "fit_plane_ransac",
    "get_profile",
    "keep_largest_cluster",
    "map_to_original",
    "pad_to_square",
    "prepare_input",
    "preprocess_dataset",
    "preprocess_sample",
    "profile_cache_dir",
    "remove_background_plane",
    "resize_mask_nearest",
    "resize_xyz_nearest",
    "rgb_to_tensor",
    "source_key",
    "square_geometry",
]
