"""Named preprocessing profiles, and the per-sample offline cleaning they drive.

CFM's authors traced most reports of "numbers below the paper" to datasets preprocessed the M3DM way: the two
codebases expect *different* preprocessed copies (M3DM also blacks out the background of the RGB, CFM keeps it).
A profile names one such recipe; its fingerprint keys the cache so the copies never mix.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

import numpy as np

from mmiad.data.errors import DataError
from mmiad.data.preprocess.cluster import keep_largest_cluster
from mmiad.data.preprocess.plane import remove_background_plane
from mmiad.data.sample import Sample

#: Bumped when the cleaning algorithm changes in a way that changes its output, to invalidate cached copies.
ALGORITHM_VERSION = 1
RGB_PAD_MODES = ("edge", "constant")


@dataclass(frozen=True)
class PreprocessProfile:
    """One preprocessing recipe: offline cleaning plus the online padding it is meant to be used with.

    Attributes:
        name: Profile name (``cfm``, ``m3dm``, ``none`` or a user's own).
        remove_plane: Fit the support plane on the image border and remove the points near it.
        plane_distance_threshold: RANSAC inlier threshold of the plane fit (0.004 m officially).
        plane_removal_threshold: Points closer than this to the plane are removed (0.005 m officially).
        border: Width in pixels of the border strips the plane is fitted on.
        ransac_n: Points per RANSAC hypothesis.
        ransac_iterations: RANSAC hypotheses.
        cluster: Keep only the largest DBSCAN cluster.
        cluster_eps: DBSCAN radius (0.006 m officially).
        cluster_min_points: DBSCAN core threshold, the point itself included.
        zero_rgb_background: Black out the RGB pixels whose points the cleaning removed (M3DM's saved RGB).
        pad_multiple: Online: the square canvas side is the larger side rounded up to this multiple.
        rgb_pad_mode: Online: ``edge`` (CFM's SquarePad) or ``constant`` (zeros, M3DM's padded RGB).
        seed: RANSAC seed.
    """

    name: str
    remove_plane: bool = True
    plane_distance_threshold: float = 0.004
    plane_removal_threshold: float = 0.005
    border: int = 10
    ransac_n: int = 50
    ransac_iterations: int = 1000
    cluster: bool = True
    cluster_eps: float = 0.006
    cluster_min_points: int = 30
    zero_rgb_background: bool = False
    pad_multiple: int = 100
    rgb_pad_mode: str = "edge"
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.name or any(c in self.name for c in "/\\"):
            raise ValueError(f"profile name must be a non-empty folder-safe string, got {self.name!r}")
        if self.rgb_pad_mode not in RGB_PAD_MODES:
            raise ValueError(f"rgb_pad_mode must be one of {RGB_PAD_MODES}, got {self.rgb_pad_mode!r}")
        positives = {
            "plane_distance_threshold": self.plane_distance_threshold,
            "plane_removal_threshold": self.plane_removal_threshold,
            "border": self.border,
            "ransac_n": self.ransac_n - 2,
            "ransac_iterations": self.ransac_iterations,
            "cluster_eps": self.cluster_eps,
            "cluster_min_points": self.cluster_min_points,
            "pad_multiple": self.pad_multiple,
        }
        bad = [field for field, value in positives.items() if not value > 0]
        if bad:
            raise ValueError(f"profile {self.name!r}: {', '.join(bad)} out of range (ransac_n must be >= 3)")

    @property
    def is_identity(self) -> bool:
        """True when the profile changes nothing offline (the raw data is used as is)."""
        return not (self.remove_plane or self.cluster or self.zero_rgb_background)

    def fingerprint(self) -> str:
        """A short stable hash of every field (and the algorithm version), used to key cached copies."""
        payload = {"algorithm_version": ALGORITHM_VERSION, **dataclasses.asdict(self)}
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


PROFILES: dict[str, PreprocessProfile] = {
    # CFM and Uni-RCM: only the TIFF is cleaned; the RGB keeps its background and is edge-padded online.
    "cfm": PreprocessProfile(name="cfm", zero_rgb_background=False, rgb_pad_mode="edge"),
    # M3DM (post-fix release) and BTF: the removed points are also blacked out in the RGB, zero-padded.
    "m3dm": PreprocessProfile(name="m3dm", zero_rgb_background=True, rgb_pad_mode="constant"),
    # Raw data: no cleaning at all.
    "none": PreprocessProfile(name="none", remove_plane=False, cluster=False, rgb_pad_mode="edge"),
}


def get_profile(name: str | PreprocessProfile) -> PreprocessProfile:
    """Look up a named profile (a profile instance is returned as is).

    Raises:
        ValueError: naming the known profiles when ``name`` is unknown.
    """
    if isinstance(name, PreprocessProfile):
        return name
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown preprocessing profile {name!r}; known profiles: {', '.join(PROFILES)}") from None


def preprocess_sample(sample: Sample, profile: PreprocessProfile | str) -> Sample:
    """Clean one sample at its original resolution (no padding: that happens online).

    Order as in the official script: plane removal, then largest-cluster cleaning. The official code pads between
    the two; zero padding adds only invalid points, so clustering the unpadded cloud gives the same result.

    With ``zero_rgb_background`` the RGB is zeroed where cleaning *removed* a point, as M3DM's
    ``remove_plane``/``connected_components_cleaning`` do; pixels that were already invalid in the raw scan keep
    their colour there too.

    Returns:
        A new Sample; the input is never modified.

    Raises:
        DataError: naming the xyz file when the plane cannot be fitted or no valid point is left.
    """
    profile = get_profile(profile)
    path = sample.record.xyz_path if sample.record is not None else None
    valid = np.asarray(sample.valid, dtype=bool) & np.any(sample.xyz != 0, axis=-1)
    xyz = np.where(valid[..., None], sample.xyz, 0).astype(np.float32)
    if profile.remove_plane:
        try:
            xyz, valid = remove_background_plane(
                xyz,
                valid,
                border=profile.border,
                distance_threshold=profile.plane_distance_threshold,
                removal_threshold=profile.plane_removal_threshold,
                ransac_n=profile.ransac_n,
                num_iterations=profile.ransac_iterations,
                seed=profile.seed,
            )
        except ValueError as error:
            raise DataError(path, f"background plane removal failed: {error}") from error
    if profile.cluster:
        try:
            xyz, valid = keep_largest_cluster(
                xyz, valid, eps=profile.cluster_eps, min_points=profile.cluster_min_points
            )
        except (ValueError, OverflowError, FloatingPointError, MemoryError) as error:
            raise DataError(path, f"point clustering failed: {error}") from error
    if not valid.any():
        raise DataError(path, f"no valid point left after preprocessing with profile {profile.name!r}")
    rgb = np.array(sample.rgb, copy=True)
    if profile.zero_rgb_background:
        rgb[np.asarray(sample.valid, dtype=bool) & ~valid] = 0
    gt_mask = None if sample.gt_mask is None else np.array(sample.gt_mask, copy=True)
    return dataclasses.replace(sample, rgb=rgb, xyz=xyz, valid=valid, gt_mask=gt_mask)
