"""Turning CFM's per-direction discrepancies into one anomaly map and image score.

The paper multiplies the two directions' maps (a defect must disagree with *both* mappings to score high while
noise in one modality is damped), smooths with a Gaussian of σ=4 and takes the maximum as the image score.
The official code instead smooths with a box-filter cascade and normalises the map differently for each metric;
``compat=True`` reproduces that so published numbers can be matched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmiad.postprocess.smoothing import smooth_maps

AGGREGATIONS = ("product", "sum", "max", "2d", "3d")


def aggregate(map_2d: torch.Tensor, map_3d: torch.Tensor, how: str) -> torch.Tensor:
    """Combine the 3D→2D (``map_2d``) and 2D→3D (``map_3d``) discrepancy maps (CFM Tab. 6 ablation)."""
    if how == "product":
        return map_2d * map_3d
    if how == "sum":
        return map_2d + map_3d
    if how == "max":
        return torch.maximum(map_2d, map_3d)
    if how == "2d":
        return map_2d
    if how == "3d":
        return map_3d
    raise ValueError(f"unknown aggregation {how!r}; expected one of {AGGREGATIONS}")


@dataclass
class ScoredMap:
    """Final map, image score and (compat only) the per-metric maps of the official evaluation."""

    anomaly_map: torch.Tensor
    score: float
    metric_maps: dict[str, torch.Tensor]


def _mean_nonzero(values: torch.Tensor) -> float:
    nonzero = values[values != 0]
    return float(nonzero.mean()) if nonzero.numel() else 1.0


def finalize_map(combined: torch.Tensor, *, out_size: int, smoothing: str, sigma: float, compat: bool) -> ScoredMap:
    """Upsample a G×G combined map to the input size, smooth it, score it.

    Args:
        combined: G×G combined discrepancy (zero on background).
        out_size: Model input side (224).
        smoothing: ``gaussian`` (paper), ``box_cascade`` (official), ``pil_uint8`` or ``none``.
        sigma: Gaussian σ in pixels of the input resolution.
        compat: Apply the official per-metric normalisations (AUPRO map ÷ mean of non-zero; image score
            max ÷ sqrt(mean of non-zero); P-AUROC map ÷ sqrt(mean)).
    """
    if combined.shape[-1] != out_size:
        combined = F.interpolate(combined[None, None], size=(out_size, out_size), mode="bilinear", align_corners=False)[
            0, 0
        ]
    smoothed = smooth_maps(combined, smoothing, sigma)
    if not compat:
        return ScoredMap(smoothed, float(smoothed.max()), {})
    mean_nonzero = _mean_nonzero(smoothed)
    mean_all = float(smoothed.mean()) or 1.0
    metric_maps = {
        "aupro": smoothed / mean_nonzero,
        "pixel_auroc": smoothed / mean_all**0.5,
    }
    return ScoredMap(smoothed, float((smoothed / mean_nonzero**0.5).max()), metric_maps)
