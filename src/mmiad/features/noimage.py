"""``none``: the image side of ``--extractors`` for methods that read the point cloud only (GLFM).

The feature pipeline always runs one 2D and one 3D extractor. A point-only method should not pay for a 2D
backbone (DINO ViT-B/8 is most of an extraction's time), so this extractor returns one zero per image: a 1×1 map
of one channel, cached in a few bytes. Methods that do read 2D features get nothing useful from it, by design.
"""

from __future__ import annotations

from typing import Any

import torch

from mmiad.features.registry import register_image_extractor


class NoImageExtractor:
    """A 2D extractor that reads nothing: (B,3,S,S) → (B,1,1,1) zeros."""

    out_channels = 1

    def config(self) -> dict[str, Any]:
        """The extractor's identity (part of the cache key)."""
        return {"kind": "none"}

    def extract(self, rgb: torch.Tensor) -> torch.Tensor:
        """One zero per image, on the images' device."""
        if rgb.ndim != 4:
            raise ValueError(f"rgb must be a (B,3,H,W) tensor, got shape {tuple(rgb.shape)}")
        return rgb.new_zeros(rgb.shape[0], 1, 1, 1, dtype=torch.float32)


def _build_none(**_: Any) -> NoImageExtractor:
    """Registry factory: nothing to load, so the options do not apply."""
    return NoImageExtractor()


register_image_extractor("none", _build_none, "no 2D features (point-only methods such as GLFM)", needs_weights=False)
