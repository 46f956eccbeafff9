"""Pooling the pixels of a category's test maps once, for every pixel-level metric.

A category of MVTec 3D-AD can hold ~150 test maps of 800×800 pixels (~96 M pixels). Concatenating every map and
arg-sorting the lot (what scikit-learn and the official scripts do) costs tens of bytes per pixel. Every pixel
metric here only needs two things: the *sorted* scores of the normal pixels (the vast majority) and the scores of
the few anomalous pixels with the GT region each belongs to. So both are written straight into pre-allocated
float32 buffers (one copy of the data in all) and the normal scores are sorted in place once, to be shared by
P-AUROC and both AUPRO variants.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

# 8-connectivity, as in the official MVTec evaluation: diagonal neighbours belong to the same defect region.
EIGHT_CONNECTED = np.ones((3, 3), dtype=int)


class UndefinedMetricError(ValueError):
    """A metric cannot be computed because the data has only one class (no defect, or no normal sample).

    A subclass of ValueError so that callers who aggregate many categories can turn exactly this case into a
    missing value while still failing loudly on bad input (shape mismatches, NaN scores).
    """


def check_scores_finite(scores: np.ndarray, what: str) -> None:
    """Raise a ValueError naming the first non-finite score, since NaN silently breaks any ranking."""
    bad = ~np.isfinite(scores)
    if bad.any():
        first = int(np.flatnonzero(bad.ravel())[0])
        kind = "NaN" if np.isnan(scores.ravel()[first]) else "infinite"
        raise ValueError(
            f"{what} contains {kind} scores ({int(bad.sum())} non-finite values, first at flat index {first})"
        )


def check_pairs(masks: Sequence[np.ndarray], maps: Sequence[np.ndarray]) -> None:
    """Check that masks and maps pair up one-to-one and have the same 2-D shape, naming the first bad index."""
    if len(masks) != len(maps):
        raise ValueError(f"got {len(masks)} ground-truth masks but {len(maps)} anomaly maps")
    if len(masks) == 0:
        raise ValueError("no ground-truth masks / anomaly maps given")
    for index, (mask, amap) in enumerate(zip(masks, maps, strict=True)):
        mask_shape, map_shape = np.shape(mask), np.shape(amap)
        if len(mask_shape) != 2:
            raise ValueError(f"ground-truth mask {index} must be 2-D (H×W), got shape {mask_shape}")
        if map_shape != mask_shape:
            raise ValueError(
                f"anomaly map {index} has shape {map_shape} but its ground-truth mask has shape {mask_shape}"
            )


@dataclass
class PixelScores:
    """All pixels of a category's test set, split into normal and anomalous.

    Attributes:
        ok_sorted: float32 scores of every normal (GT == 0) pixel, sorted ascending.
        anomalous: float32 scores of every anomalous pixel, in image then row-major order.
        region: For each anomalous pixel, the index of its 8-connected GT region over the whole set.
        region_sizes: Pixel count of each GT region (``len == n_regions``).
    """

    ok_sorted: np.ndarray
    anomalous: np.ndarray
    region: np.ndarray
    region_sizes: np.ndarray

    @property
    def n_regions(self) -> int:
        """Number of connected GT regions over all images."""
        return int(self.region_sizes.size)

    @classmethod
    def from_maps(cls, masks: Sequence[np.ndarray], maps: Sequence[np.ndarray]) -> PixelScores:
        """Pool the pixels of paired masks and maps.

        Args:
            masks: H×W ground-truth masks (non-zero = anomalous); sizes may differ between images.
            maps: H×W anomaly maps, same shapes as ``masks``; higher means more anomalous.

        Raises:
            ValueError: for unpaired inputs, a shape mismatch (naming the index) or NaN/inf scores.
        """
        check_pairs(masks, maps)
        bool_masks = [np.asarray(m) for m in masks]
        bool_masks = [m if m.dtype == bool else m != 0 for m in bool_masks]
        n_anomalous = [int(np.count_nonzero(m)) for m in bool_masks]
        n_total = sum(int(m.size) for m in bool_masks)
        n_an = sum(n_anomalous)
        ok = np.empty(n_total - n_an, dtype=np.float32)
        anomalous = np.empty(n_an, dtype=np.float32)
        region = np.empty(n_an, dtype=np.int64)
        ok_at = an_at = n_regions = 0
        for index, (mask, amap) in enumerate(zip(bool_masks, maps, strict=True)):
            scores = np.asarray(amap)
            check_scores_finite(scores, f"anomaly map {index}")
            n_ok_here = mask.size - n_anomalous[index]
            ok[ok_at : ok_at + n_ok_here] = scores[~mask]
            ok_at += n_ok_here
            if n_anomalous[index]:
                labelled, n_here = ndimage.label(mask, structure=EIGHT_CONNECTED)
                end = an_at + n_anomalous[index]
                anomalous[an_at:end] = scores[mask]
                region[an_at:end] = labelled[mask] - 1 + n_regions
                an_at = end
                n_regions += n_here
        ok.sort()
        region_sizes = np.bincount(region, minlength=n_regions)
        return cls(ok_sorted=ok, anomalous=anomalous, region=region, region_sizes=region_sizes)

    def require_both_classes(self, metric: str) -> None:
        """Raise :class:`UndefinedMetricError` unless there are normal *and* anomalous pixels."""
        if self.anomalous.size == 0:
            raise UndefinedMetricError(f"{metric} is undefined: the ground truth has no anomalous pixel at all")
        if self.ok_sorted.size == 0:
            raise UndefinedMetricError(f"{metric} is undefined: every ground-truth pixel is anomalous")
