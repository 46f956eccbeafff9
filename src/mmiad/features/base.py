"""The contract every frozen feature extractor fulfils, so every method runs on deep or weight-free features.

A 2D extractor maps a batch of normalised RGB tensors to a low-resolution feature map. A 3D extractor maps one
organized point cloud to :class:`PointFeatures`: features attached to a subset of points (group centres for
Point-MAE, every point for FPFH) plus, for every valid pixel, which feature rows to blend and with which weights.
Keeping that sparse form (instead of a dense 224×224×1152 grid) is what makes caching 3D features affordable:
the dense grid is 231 MB per sample, the sparse form a few MB, and :meth:`PointFeatures.to_grid` rebuilds the
official dense map on demand.

Extractors that can compute on a GPU also follow :class:`DeviceExtractor` (a ``to(device)`` like
``nn.Module.to``), and :class:`PointFeatures` projects on the device its tensors are on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from mmiad.features.projection import project_to_grid

# The sparse projection pays off when each feature row is shared by at least this many pixels.
SPARSE_ROWS_PER_PIXEL = 4

#: Which points of an organized cloud feed the 3D features: ``"all"`` keeps a point only when all three of its
#: coordinates are non-zero (the official CFM, M3DM, Uni-RCM and BTF feature code), ``"any"`` when at least one is.
NONZERO_RULES = ("all", "any")


def feature_points(xyz: np.ndarray, valid: np.ndarray, nonzero: str) -> np.ndarray:
    """The pixels whose points go into the 3D features: ``valid`` and non-zero under the ``nonzero`` rule.

    Reading keeps every point that is not all-zero (:func:`mmiad.data.io.valid_points`), because a real point can
    lie exactly on a coordinate plane. The official feature code is stricter (``torch.all(pc != 0, dim=1)``), and
    the published numbers come from it, so the 3D feature path applies ``"all"`` by default on top of ``valid``.
    The choice changes which points are grouped, so also the FPS centres, the features near such points, and the
    valid pixels the projection and the foreground mask start from.

    Args:
        xyz: (S,S,3) organized cloud.
        valid: (S,S) bool mask from reading and preprocessing.
        nonzero: One of :data:`NONZERO_RULES`.

    Returns:
        (S,S) bool mask, a subset of ``valid``.
    """
    if nonzero not in NONZERO_RULES:
        raise ValueError(f"nonzero must be one of {NONZERO_RULES}, got {nonzero!r}")
    nonzero_coords = np.asarray(xyz) != 0
    kept = nonzero_coords.all(axis=-1) if nonzero == "all" else nonzero_coords.any(axis=-1)
    return np.asarray(valid, dtype=bool) & kept


@dataclass
class PointFeatures:
    """Point-level features of one sample and how they project onto its pixel grid.

    Attributes:
        features: M×C features, one row per group centre (or per point).
        pixel_index: N flat indices (row * grid_size + col) of the valid pixels of the input grid.
        neighbors: N×k rows of ``features`` that each valid pixel blends.
        weights: N×k blending weights (rows sum to 1).
        grid_size: Side of the square input grid the pixel indices refer to (224 in the papers).
    """

    features: torch.Tensor
    pixel_index: torch.Tensor
    neighbors: torch.Tensor
    weights: torch.Tensor
    grid_size: int

    @property
    def channels(self) -> int:
        """Feature dimension C."""
        return int(self.features.shape[1])

    @property
    def device(self) -> torch.device:
        """Where the tensors are; the projections compute there."""
        return self.features.device

    def to(self, device: torch.device | str) -> PointFeatures:
        """The same features with every tensor on ``device`` (self when already there).

        The cache and the methods' stores keep features on the CPU; a method that projects or scores on a GPU
        moves them there first, and :meth:`to_grid`, :meth:`foreground` and :meth:`dense` then run on it.
        """
        device = torch.device(device)
        tensors = (self.features, self.pixel_index, self.neighbors, self.weights)
        if all(t.device == device for t in tensors):
            return self
        features, pixel_index, neighbors, weights = (t.to(device) for t in tensors)
        return PointFeatures(features, pixel_index, neighbors, weights, self.grid_size)

    def dense(self) -> torch.Tensor:
        """C×S×S map with the interpolated feature at every valid pixel and zeros elsewhere."""
        size = self.grid_size
        device = self.features.device
        # One neighbour column at a time: gathering all k at once would hold N×k×C (700 MB for Point-MAE at 224).
        per_pixel = torch.zeros(self.pixel_index.numel(), self.channels, dtype=self.features.dtype, device=device)
        for column in range(self.neighbors.shape[1]):
            rows = self.features.index_select(0, self.neighbors[:, column])
            per_pixel.addcmul_(rows, self.weights[:, column : column + 1].to(rows.dtype))
        grid = torch.zeros(self.channels, size * size, dtype=self.features.dtype, device=device)
        grid[:, self.pixel_index] = per_pixel.T
        return grid.view(self.channels, size, size)

    def to_grid(self, out_size: int, method: str = "auto") -> torch.Tensor:
        """The official projection: dense map, 3×3 average pooling (no padding), adaptive average to ``out_size``.

        The unpadded pooling shrinks S to S−2 and the adaptive pooling brings it to ``out_size`` (upsampling
        222→224 in CFM, pooling to 56 in M3DM/Uni-RCM, to 28 in BTF), as the official code does. When far fewer
        feature rows than pixels are blended (Point-MAE's groups), the same linear map is applied as one sparse
        product (:mod:`mmiad.features.projection`), several times faster; per-pixel features (FPFH) take the
        dense path, which is faster for them. Both agree to float rounding; ``method`` (``auto``, ``sparse`` or
        ``dense``) forces one, for benchmarks and tests.
        """
        if method not in ("auto", "sparse", "dense"):
            raise ValueError(f"unknown projection method {method!r}; expected auto, sparse or dense")
        grouped = self.features.shape[0] * SPARSE_ROWS_PER_PIXEL <= self.pixel_index.numel()
        if method == "sparse" or (method == "auto" and grouped):
            return project_to_grid(
                self.features, self.pixel_index, self.neighbors, self.weights, self.grid_size, out_size
            )
        grid = F.avg_pool2d(self.dense().unsqueeze(0), kernel_size=3, stride=1)
        return F.adaptive_avg_pool2d(grid, out_size)[0]

    def foreground(self, out_size: int) -> torch.Tensor:
        """out_size×out_size bool: where the projected map is non-zero (the official foreground test).

        The 3×3 pooling bleeds, so this is the valid-pixel mask slightly dilated, as in the official code.
        """
        mask = torch.zeros(self.grid_size * self.grid_size, device=self.pixel_index.device)
        mask[self.pixel_index] = 1.0
        mask = F.avg_pool2d(mask.view(1, 1, self.grid_size, self.grid_size), kernel_size=3, stride=1)
        return F.adaptive_avg_pool2d(mask, out_size)[0, 0] > 0

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Flat tensors for a safetensors file (the feature cache)."""
        return {
            f"{prefix}.features": self.features.contiguous(),
            f"{prefix}.pixel_index": self.pixel_index.contiguous(),
            f"{prefix}.neighbors": self.neighbors.contiguous(),
            f"{prefix}.weights": self.weights.contiguous(),
            f"{prefix}.grid_size": torch.tensor([self.grid_size]),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str) -> PointFeatures:
        """Inverse of :meth:`to_tensors`."""
        return cls(
            features=tensors[f"{prefix}.features"],
            pixel_index=tensors[f"{prefix}.pixel_index"],
            neighbors=tensors[f"{prefix}.neighbors"],
            weights=tensors[f"{prefix}.weights"],
            grid_size=int(tensors[f"{prefix}.grid_size"][0]),
        )


def identity_point_features(features: torch.Tensor, valid: np.ndarray) -> PointFeatures:
    """PointFeatures for per-point descriptors (FPFH): each valid pixel carries its own feature row."""
    size = int(valid.shape[0])
    pixel_index = torch.from_numpy(np.flatnonzero(valid.reshape(-1))).long()
    count = int(pixel_index.numel())
    return PointFeatures(
        features=features,
        pixel_index=pixel_index,
        neighbors=torch.arange(count).unsqueeze(1),
        weights=torch.ones(count, 1, dtype=features.dtype),
        grid_size=size,
    )


@runtime_checkable
class ImageFeatureExtractor(Protocol):
    """A frozen 2D extractor: (B,3,S,S) ImageNet-normalised RGB → (B,C,h,w) feature map."""

    out_channels: int

    def config(self) -> dict[str, Any]:
        """Everything that changes the features (name, layers, weights hash); part of cache keys."""
        ...

    def extract(self, rgb: torch.Tensor) -> torch.Tensor:
        """Features for a batch of images; must be deterministic."""
        ...


@runtime_checkable
class PointFeatureExtractor(Protocol):
    """A frozen 3D extractor: one S×S×3 organized cloud + valid mask → :class:`PointFeatures`."""

    out_channels: int

    def config(self) -> dict[str, Any]:
        """Everything that changes the features (name, layers, weights hash); part of cache keys."""
        ...

    def extract(self, xyz: np.ndarray, valid: np.ndarray) -> PointFeatures:
        """Features for one cloud; must be deterministic."""
        ...


@runtime_checkable
class DeviceExtractor(Protocol):
    """An extractor that can compute on a torch device (the deep ones and the texture descriptor).

    The method is optional for extractors, so it is a protocol of its own: an extractor without it computes on the
    CPU whatever device a pipeline is given. FPFH is one by design (NumPy and a k-d tree; the CPU work overlaps the
    device's), and so are the ONNX runtime's extractors. An extractor with it computes on :attr:`device`, takes
    inputs on any device and returns its outputs on :attr:`device`; the pipeline brings them back to the CPU.
    """

    @property
    def device(self) -> torch.device:
        """Where the extractor computes."""
        ...

    def to(self, device: torch.device | str) -> object:
        """Move the extractor's weights and constants to ``device`` (in place, like ``nn.Module.to``)."""
        ...


def extractor_device(extractor: object) -> torch.device:
    """Where an extractor computes: its :attr:`DeviceExtractor.device`, or the CPU for one that cannot move."""
    return extractor.device if isinstance(extractor, DeviceExtractor) else torch.device("cpu")


def place_extractor(extractor: object, device: torch.device) -> torch.device:
    """Move an extractor to ``device`` when it can move, and say where it computes from now on."""
    if isinstance(extractor, DeviceExtractor):
        extractor.to(device)
    return extractor_device(extractor)
