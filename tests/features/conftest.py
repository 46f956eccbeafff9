"""Tiny random-init deep extractors shared by the device and pipeline tests (seconds, not minutes, on 2 cores)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from tiny_clouds import randomise

from mmiad.features.pointmae import PointMaeEncoder, PointMaeExtractor, PointMaePreset
from mmiad.features.vit import VisionTransformer, VitExtractor, VitPreset

#: A ViT 4 px per patch, 32 wide, LayerScale on, position grid 4 (resized for other inputs, as DINO's).
TINY_VIT = VitPreset(
    "tiny", embed_dim=32, depth=3, num_heads=2, patch_size=4, pos_grid=4, layer_scale=True, keep_blocks=3, weights=()
)
#: Point-MAE's 12 blocks and layers 3, 7, 11, but 16 groups of 8 points (and a 32-wide encoder, see below).
SMALL_MAE = PointMaePreset("small", num_group=16, group_size=8, keep_blocks=12, layers=(3, 7, 11))


def make_tiny_vit(seed: int = 0) -> VitExtractor:
    """A tiny ViT with seeded random weights (position embedding, CLS and LayerScale of order 0.3, not 0)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = VisionTransformer(TINY_VIT)
        for parameter in (model.pos_embed, model.cls_token, *(b.ls1.gamma for b in model.blocks)):  # type: ignore
            torch.nn.init.normal_(parameter, std=0.3)
    return VitExtractor(model, f"random-{seed}")


def make_tiny_pointmae(seed: int = 0, fps_backend: str = "auto") -> PointMaeExtractor:
    """A narrow Point-MAE with every tensor random, BatchNorm running statistics included."""
    model = PointMaeEncoder(12, (3, 7, 11), dim=32, num_heads=2)
    model.load_state_dict(randomise(model, seed))
    return PointMaeExtractor(model, SMALL_MAE, f"random-{seed}", fps_backend)


@pytest.fixture
def tiny_vit() -> Callable[..., VitExtractor]:
    """:func:`make_tiny_vit`, as a fixture so any test module can use it."""
    return make_tiny_vit


@pytest.fixture
def tiny_pointmae() -> Callable[..., PointMaeExtractor]:
    """:func:`make_tiny_pointmae`, as a fixture so any test module can use it."""
    return make_tiny_pointmae
