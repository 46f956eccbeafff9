"""Named extractor presets: which 2D and 3D extractor a method runs on, as data.

``weightfree`` needs no downloaded file and runs everywhere (air-gapped lines, CI). The deep presets are the
papers' DINO ViT-B/8 + Point-MAE, and CFM's layer-pruned variants (M: 8 blocks, S: 4 blocks, T: 1 block), which
need their checkpoint files in the weights directory.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmiad.data.preprocess import get_profile
from mmiad.features.base import ImageFeatureExtractor, PointFeatureExtractor
from mmiad.features.cache import FeatureCache
from mmiad.features.pipeline import FeaturePipeline


@dataclass(frozen=True)
class ExtractorPreset:
    """A pair of extractor presets.

    Attributes:
        name: What ``--extractors`` takes.
        image: 2D extractor preset (``texture`` or a ViT preset name).
        point: 3D extractor preset (``fpfh`` or a Point-MAE preset name).
        description: One line for ``--help`` and docs.
    """

    name: str
    image: str
    point: str
    description: str


EXTRACTOR_PRESETS: dict[str, ExtractorPreset] = {
    p.name: p
    for p in (
        ExtractorPreset("weightfree", "texture", "fpfh", "colour + filter-bank 2D, FPFH 3D; no weights needed"),
        ExtractorPreset("dino-pointmae", "dino_vitb8", "pointmae", "DINO ViT-B/8 + Point-MAE, 12 blocks (paper)"),
        ExtractorPreset("dino-pointmae-m", "dino_vitb8_keep8", "pointmae_keep8", "CFM-M: both pruned to 8 blocks"),
        ExtractorPreset("dino-pointmae-s", "dino_vitb8_keep4", "pointmae_keep4", "CFM-S: both pruned to 4 blocks"),
        ExtractorPreset("dino-pointmae-t", "dino_vitb8_keep1", "pointmae_keep1", "CFM-T: both pruned to 1 block"),
        ExtractorPreset("wrn50-fpfh", "wrn50", "fpfh", "Wide-ResNet-50-2 layers 2+3 + FPFH (BTF paper)"),
        ExtractorPreset("wrn50-pointmae", "wrn50", "pointmae", "Wide-ResNet-50-2 layers 2+3 + Point-MAE"),
    )
}


def get_extractor_preset(name: str) -> ExtractorPreset:
    """The preset called ``name``, with an error listing the known ones."""
    if name not in EXTRACTOR_PRESETS:
        raise ValueError(f"unknown extractor preset {name!r}; available: {', '.join(EXTRACTOR_PRESETS)}")
    return EXTRACTOR_PRESETS[name]


def build_extractors(
    name: str,
    *,
    weights_dir: str | Path | None = None,
    random_init: bool = False,
    seed: int = 0,
    point_options: Mapping[str, Any] | None = None,
) -> tuple[ImageFeatureExtractor, PointFeatureExtractor]:
    """Instantiate the 2D and 3D extractors of a preset (deep ones load weights from ``weights_dir``).

    Args:
        name: Extractor preset.
        weights_dir: The weights folder.
        random_init: Random weights (tests and smoke runs only).
        seed: Seed of the random weights.
        point_options: Keyword options of the 3D extractor, e.g. ``{"batchnorm": "running"}`` or
            ``{"drop_path": "sampled", "drop_path_seed": 3}`` for Point-MAE and ``{"nonzero": "any"}`` for
            either; they enter the extractor's config, hence the feature cache key and the model files.
    """
    preset = get_extractor_preset(name)
    options = dict(point_options or {})
    if preset.image == "texture":
        from mmiad.features.texture import TextureExtractor

        image: ImageFeatureExtractor = TextureExtractor()
    elif preset.image == "wrn50":
        from mmiad.features.wideresnet import build_wrn50_extractor

        image = build_wrn50_extractor(weights_dir=weights_dir, random_init=random_init, seed=seed)
    else:
        from mmiad.features.weights import build_image_extractor

        image = build_image_extractor(preset.image, weights_dir=weights_dir, random_init=random_init, seed=seed)
    try:
        if preset.point == "fpfh":
            from mmiad.features.fpfh import FPFHExtractor

            point: PointFeatureExtractor = FPFHExtractor(**options)
        else:
            from mmiad.features.weights import build_point_extractor

            point = build_point_extractor(
                preset.point, weights_dir=weights_dir, random_init=random_init, seed=seed, **options
            )
    except TypeError as error:  # an option the 3D extractor does not have
        raise ValueError(f"point_options {options} do not apply to the {preset.point!r} extractor: {error}") from error
    return image, point


def default_cache_dir() -> Path:
    """``$MMIAD_CACHE`` or ``~/.cache/mmiad``: preprocessed copies and cached features live here."""
    return Path(os.environ.get("MMIAD_CACHE", Path.home() / ".cache" / "mmiad"))


def build_pipeline(
    extractors: str,
    *,
    profile: str,
    image_size: int = 224,
    weights_dir: str | Path | None = None,
    random_init: bool = False,
    cache_dir: str | Path | None = None,
    use_feature_cache: bool = True,
    point_options: Mapping[str, Any] | None = None,
) -> FeaturePipeline:
    """A feature pipeline for an extractor preset and a preprocessing profile, caching under ``cache_dir``.

    ``point_options`` go to the 3D extractor (see :func:`build_extractors`).
    """
    image, point = build_extractors(
        extractors, weights_dir=weights_dir, random_init=random_init, point_options=point_options
    )
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return FeaturePipeline(
        image,
        point,
        get_profile(profile),
        image_size,
        FeatureCache(root / "features", enabled=use_feature_cache),
        root,
    )
