"""Smoothing of anomaly maps, shared by every method.

The CFM paper smooths with a Gaussian of σ=4; the official code approximates it with a cascade of box filters
(5 passes of 5×5, then 3 passes of 7×7, zero padding; effective σ≈4.7). M3DM/BTF blur with PIL's GaussianBlur on a
uint8-quantised copy of the map. The paper's Gaussian is the default; the others exist for ``compat`` runs that
reproduce the official numbers.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

SmoothingName = Literal["gaussian", "box_cascade", "pil_uint8", "none"]
SMOOTHINGS: tuple[str, ...] = ("gaussian", "box_cascade", "pil_uint8", "none")


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Normalised 1D Gaussian taps out to ``truncate``·σ (scipy's default), so the filter is a true Gaussian."""
    radius = max(1, math.ceil(truncate * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return (kernel / kernel.sum()).float()


def gaussian_smooth(maps: torch.Tensor, sigma: float = 4.0) -> torch.Tensor:
    """Separable Gaussian blur of (B,H,W) maps, mirror padding (scipy.ndimage.gaussian_filter with mode="mirror")."""
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel1d(sigma).to(maps.dtype)
    radius = kernel.numel() // 2
    x = maps.unsqueeze(1)
    height, width = x.shape[-2:]
    mode = "reflect" if radius < min(height, width) else "replicate"
    x = F.pad(x, (radius, radius, 0, 0), mode=mode)
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    x = F.pad(x, (0, 0, radius, radius), mode=mode)
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    return x[:, 0]


def box_passes(maps: torch.Tensor, passes: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """Repeated size×size box filters of (B,H,W) maps, zero padding (the divisor is always size²).

    ``passes`` lists ``(size, repeats)`` in order: the official CFM cascade is ``((5, 5), (7, 3))``; CMDR-IAD also
    pre-smooths a map with ``((5, 3), (7, 2))`` and its 3D-only script with ``((5, 1),)``.
    """
    x = maps.unsqueeze(1)
    for size, repeats in passes:
        kernel = torch.full((1, 1, size, size), 1.0 / (size * size), dtype=maps.dtype, device=maps.device)
        for _ in range(repeats):
            x = F.conv2d(x, kernel, padding=size // 2)
    return x[:, 0]


def box_cascade_smooth(maps: torch.Tensor) -> torch.Tensor:
    """The official CFM smoothing: 5 passes of a 5×5 box then 3 passes of a 7×7 box, zero padding."""
    return box_passes(maps, ((5, 5), (7, 3)))


def pil_uint8_smooth(maps: torch.Tensor, radius: float = 4.0) -> torch.Tensor:
    """M3DM/BTF's blur: scale to [0,1] by the max, quantise to uint8, PIL GaussianBlur(radius), scale back."""
    out = torch.empty_like(maps)
    for index, anomaly_map in enumerate(maps):
        peak = float(anomaly_map.max())
        if peak <= 0:
            out[index] = anomaly_map
            continue
        quantised = (anomaly_map / peak * 255.0).clamp(0, 255).to(torch.uint8).numpy()
        blurred = Image.fromarray(quantised, mode="L").filter(ImageFilter.GaussianBlur(radius=radius))
        out[index] = torch.from_numpy(np.asarray(blurred, dtype=np.float32) / 255.0 * peak)
    return out


def smooth_maps(maps: torch.Tensor, method: str = "gaussian", sigma: float = 4.0) -> torch.Tensor:
    """Smooth (B,H,W) or (H,W) maps with the named method."""
    squeeze = maps.dim() == 2
    batch = maps.unsqueeze(0) if squeeze else maps
    if method == "gaussian":
        result = gaussian_smooth(batch, sigma)
    elif method == "box_cascade":
        result = box_cascade_smooth(batch)
    elif method == "pil_uint8":
        result = pil_uint8_smooth(batch, sigma)
    elif method == "none":
        result = batch
    else:
        raise ValueError(f"unknown smoothing {method!r}; expected one of {SMOOTHINGS}")
    return result[0] if squeeze else result
