"""From per-patch nearest distances to an anomaly map at the model input size (BTF and M3DM share this)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmiad.postprocess.smoothing import smooth_maps


def patch_map(distances: torch.Tensor, grid: int, out_size: int, *, smoothing: str, sigma: float) -> torch.Tensor:
    """grid² distances → grid×grid → bilinear to out_size (align_corners=False, as ``F.interpolate``) → blur.

    ``smoothing="pil_uint8"`` is the official M3DM/BTF ``KNNGaussianBlur(4)`` (PIL radius 4 on a uint8 copy);
    ``"gaussian"`` the papers' Gaussian of σ=4.
    """
    if distances.numel() != grid * grid:
        raise ValueError(f"{distances.numel()} patch distances do not form a {grid}×{grid} grid")
    grid_map = distances.float().view(1, 1, grid, grid)
    if grid != out_size:
        grid_map = F.interpolate(grid_map, size=(out_size, out_size), mode="bilinear", align_corners=False)
    return smooth_maps(grid_map[0, 0], smoothing, sigma)
