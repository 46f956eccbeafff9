"""Multi-level ViT tokens as one feature map: several blocks' patch tokens plus the last one's CLS token.

RAD (retrieval-based anomaly detection) needs, per image, the normed patch tokens of blocks 3, 6, 9 and 11 and the
normed CLS token of block 11. The feature pipeline moves one C×h×w map per image (batched, cached, on the device,
in the precision asked for), so this extractor packs them into one: the layers' maps stacked along the channels,
then the CLS token broadcast over the grid as a last channel group. :func:`split_tokens` unpacks them. The
broadcast costs one layer's worth of cache space (a fifth with four layers) and buys the whole pipeline unchanged.

The official RAD runs DINOv3 ViT-B/16 at 448² (28×28 patches); mmiad has no DINOv3 weights and uses DINO ViT-B/8
at 224², which gives the same 28×28 grid. That is a substitution, reported as such wherever RAD's numbers appear.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from mmiad.features.registry import register_image_extractor
from mmiad.features.vit import VisionTransformer

#: RAD's blocks (0-based; the paper's figure calls them layers 4, 7, 10 and 12).
RAD_LAYERS = (3, 6, 9, 11)


class VitTokensExtractor:
    """An :class:`~mmiad.features.base.ImageFeatureExtractor` whose map holds several blocks and a CLS token.

    Attributes:
        token_layers: The 0-based blocks whose patch tokens come first, in this order.
        layer_channels: Channels of one block (the ViT's width).
        has_cls: Always True: the last ``layer_channels`` channels are the last block's CLS token, constant over
            the grid.
        out_channels: ``(len(token_layers) + 1) * layer_channels``.
    """

    has_cls = True

    def __init__(self, model: VisionTransformer, weights_id: str, layers: tuple[int, ...] = RAD_LAYERS) -> None:
        self.model = model.eval().requires_grad_(False)
        self.preset = model.preset
        self.weights_id = weights_id
        self.token_layers = tuple(sorted(set(layers)))
        if not self.token_layers or self.token_layers[-1] >= len(model.blocks) or self.token_layers[0] < 0:
            raise ValueError(f"layers {layers} must be within the {len(model.blocks)} kept blocks")
        self.layer_channels = model.preset.embed_dim
        self.out_channels = (len(self.token_layers) + 1) * self.layer_channels

    def config(self) -> dict[str, Any]:
        """Everything that changes the features (the cache key)."""
        settings = {k: v for k, v in asdict(self.preset).items() if k != "weights"}
        return {"kind": "vit_tokens", **settings, "layers": list(self.token_layers), "weights": self.weights_id}

    @property
    def device(self) -> torch.device:
        """Where the model's weights are."""
        return self.model.pos_embed.device

    def to(self, device: torch.device | str) -> VitTokensExtractor:
        """Move the model (see :class:`~mmiad.features.base.DeviceExtractor`); returns self."""
        self.model.to(device)
        return self

    def extract(self, rgb: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) normalised RGB → (B,(L+1)·C,H/p,W/p): the L blocks' patch maps, then the CLS broadcast."""
        if not isinstance(rgb, torch.Tensor) or rgb.ndim != 4 or rgb.shape[1] != 3 or not rgb.is_floating_point():
            shape = tuple(rgb.shape) if isinstance(rgb, torch.Tensor) else type(rgb).__name__
            raise ValueError(f"expected a float RGB batch of shape (B,3,H,W), got {shape}")
        patch = self.preset.patch_size
        if rgb.shape[2] % patch or rgb.shape[3] % patch or rgb.shape[2] == 0 or rgb.shape[3] == 0:
            raise ValueError(f"image side {tuple(rgb.shape[2:])} is not a positive multiple of patch size {patch}")
        with torch.inference_mode():
            maps, cls = self.model.forward_tokens(rgb.to(self.device, torch.float32), self.token_layers)
            rows, cols = maps[0].shape[-2:]
            broadcast = cls[-1][:, :, None, None].expand(-1, -1, rows, cols)
            packed = torch.cat([*maps, broadcast], dim=1)
        return packed.clone()  # a normal tensor, not an inference one


def split_tokens(image: torch.Tensor, layers: int, channels: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Unpack a (C_total,h,w) map of :class:`VitTokensExtractor` into ``layers`` (h·w,C) token matrices (row-major
    patches) and the (C,) CLS token (the mean of its broadcast group, which is exact for a constant)."""
    if image.ndim != 3 or image.shape[0] != (layers + 1) * channels:
        raise ValueError(f"expected ({(layers + 1) * channels},h,w) packed tokens, got {tuple(image.shape)}")
    groups = image.reshape(layers + 1, channels, -1)
    return [g.T.contiguous() for g in groups[:layers]], groups[layers].mean(dim=1)


def build_rad_extractor(
    *, weights_dir: str | Path | None = None, random_init: bool = False, seed: int = 0
) -> VitTokensExtractor:
    """DINO ViT-B/8 (the papers' weights file) with RAD's blocks 3/6/9/11 and the block-11 CLS token."""
    from mmiad.features.weights import build_image_extractor

    vit = build_image_extractor("dino_vitb8", weights_dir=weights_dir, random_init=random_init, seed=seed)
    return VitTokensExtractor(vit.model, vit.weights_id)


register_image_extractor(
    "dino_vitb8_rad",
    build_rad_extractor,
    "DINO ViT-B/8 blocks 3/6/9/11 + block-11 CLS (RAD's levels; a stand-in for its DINOv3 ViT-B/16)",
    needs_weights=True,
)
