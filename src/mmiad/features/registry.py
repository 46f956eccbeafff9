"""Extractor registries: image (2D) and point (3D) extractors by name, freely combined as ``IMAGE+POINT``.

This module imports no extractor. Each extractor module registers its names with :func:`register_image_extractor`
or :func:`register_point_extractor`, and :mod:`mmiad.features` imports the built-in ones, so a new extractor is
its own module plus one line there. ``--extractors`` takes any pair (``dino_vitb8+fpfh``, ``texture+pointmae``)
or a named preset, which is only an alias for a pair (:data:`EXTRACTOR_PRESETS`): ``weightfree`` needs no
downloaded file and runs everywhere (air-gapped lines, CI); the deep presets are the papers' DINO ViT-B/8 +
Point-MAE and CFM's layer-pruned variants (M: 8 blocks, S: 4 blocks, T: 1 block), which need checkpoint files.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from mmiad.data.preprocess import get_profile
from mmiad.features.cache import FeatureCache
from mmiad.features.pipeline import FeaturePipeline
from mmiad.utils.registry import Registry

if TYPE_CHECKING:
    from mmiad.features.base import ImageFeatureExtractor, PointFeatureExtractor

ExtractorT = TypeVar("ExtractorT")
#: ``factory(weights_dir=..., random_init=..., seed=...)`` builds a ready extractor (deep ones load weights).
Factory = Callable[..., Any]
SEPARATOR = "+"


@dataclass(frozen=True)
class ExtractorEntry(Generic[ExtractorT]):
    """One registered extractor.

    Attributes:
        name: What ``--extractors`` takes on its side of ``+``.
        factory: Builds the extractor from ``weights_dir``, ``random_init`` and ``seed``.
        description: One line for ``--help`` and docs.
        needs_weights: True when the factory reads a checkpoint file.
    """

    name: str
    factory: Callable[..., ExtractorT]
    description: str
    needs_weights: bool


def _extractor_name(name: str) -> bool:
    """Extractor names are non-empty and free of the ``IMAGE+POINT`` separator."""
    return bool(name) and SEPARATOR not in name


def _factory(entry: ExtractorEntry[Any]) -> object:
    return entry.factory


_IMAGE: Registry[ExtractorEntry[ImageFeatureExtractor]] = Registry(
    "image extractor", identity=_factory, valid_name=_extractor_name
)
_POINT: Registry[ExtractorEntry[PointFeatureExtractor]] = Registry(
    "point extractor", identity=_factory, valid_name=_extractor_name
)


def register_image_extractor(name: str, factory: Factory, description: str, *, needs_weights: bool) -> None:
    """Make ``name`` available on the image side of ``--extractors``."""
    _IMAGE.register(name, ExtractorEntry(name, factory, description, needs_weights))


def register_point_extractor(name: str, factory: Factory, description: str, *, needs_weights: bool) -> None:
    """Make ``name`` available on the point side of ``--extractors``."""
    _POINT.register(name, ExtractorEntry(name, factory, description, needs_weights))


def image_extractors() -> dict[str, ExtractorEntry[ImageFeatureExtractor]]:
    """Registered image extractors by name."""
    return dict(sorted(_IMAGE.items()))


def point_extractors() -> dict[str, ExtractorEntry[PointFeatureExtractor]]:
    """Registered point extractors by name."""
    return dict(sorted(_POINT.items()))


@dataclass(frozen=True)
class ExtractorPreset:
    """A named pair of extractors (an alias of ``image+point``).

    Attributes:
        name: What ``--extractors`` takes.
        image: Image extractor name.
        point: Point extractor name.
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
        ExtractorPreset(
            "dino-pointmae512", "dino_vitb8", "pointmae_g512", "DINO ViT-B/8 + Point-MAE 512 groups (G2SF)"
        ),
        ExtractorPreset("dino-pointmae-m", "dino_vitb8_keep8", "pointmae_keep8", "CFM-M: both pruned to 8 blocks"),
        ExtractorPreset("dino-pointmae-s", "dino_vitb8_keep4", "pointmae_keep4", "CFM-S: both pruned to 4 blocks"),
        ExtractorPreset("dino-pointmae-t", "dino_vitb8_keep1", "pointmae_keep1", "CFM-T: both pruned to 1 block"),
        ExtractorPreset("wrn50-fpfh", "wrn50", "fpfh", "Wide-ResNet-50-2 layers 2+3 + FPFH (BTF paper)"),
        ExtractorPreset("wrn50-pointmae", "wrn50", "pointmae", "Wide-ResNet-50-2 layers 2+3 + Point-MAE"),
        ExtractorPreset(
            "dino-rad", "dino_vitb8_rad", "pointmae", "DINO ViT-B/8 blocks 3/6/9/11 + CLS (RAD, substituted)"
        ),
        ExtractorPreset("glfm", "none", "pointmae_glfm", "GLFM: no 2D, Point-MAE blocks 0+1 (768-d)"),
    )
}


def parse_extractors(spec: str) -> tuple[str, str]:
    """``(image, point)`` names of a preset alias or an ``IMAGE+POINT`` pair, checked against the registries.

    Raises:
        ValueError: naming the unknown part and listing what is available.
    """
    if spec in EXTRACTOR_PRESETS:
        preset = EXTRACTOR_PRESETS[spec]
        image, point = preset.image, preset.point
    elif spec.count(SEPARATOR) == 1:
        image, point = (part.strip() for part in spec.split(SEPARATOR))
    else:
        raise ValueError(f"unknown extractors {spec!r}; give a preset or IMAGE+POINT.\n{extractors_help()}")
    _IMAGE.get(image)  # an unknown name fails listing the registered ones
    _POINT.get(point)
    return image, point


def extractors_help() -> str:
    """The ``--extractors`` help text, from the registries."""
    presets = ", ".join(f"{p.name} ({p.image}+{p.point})" for p in EXTRACTOR_PRESETS.values())
    return (
        f"a preset: {presets}; or any IMAGE+POINT pair, IMAGE one of {', '.join(image_extractors())}, "
        f"POINT one of {', '.join(point_extractors())}"
    )


def get_extractor_preset(name: str) -> ExtractorPreset:
    """The preset called ``name``, or the pair ``IMAGE+POINT`` as an unnamed preset."""
    image, point = parse_extractors(name)
    return EXTRACTOR_PRESETS.get(name, ExtractorPreset(name, image, point, f"{image} + {point}"))


def build_extractors(
    name: str,
    *,
    weights_dir: str | Path | None = None,
    random_init: bool = False,
    seed: int = 0,
    point_options: Mapping[str, Any] | None = None,
) -> tuple[ImageFeatureExtractor, PointFeatureExtractor]:
    """Instantiate the 2D and 3D extractors of a preset or pair (deep ones load weights from ``weights_dir``).

    Args:
        name: Extractor preset or ``IMAGE+POINT`` pair.
        weights_dir: The weights folder.
        random_init: Random weights (tests and smoke runs only).
        seed: Seed of the random weights.
        point_options: Keyword options of the 3D extractor, e.g. ``{"batchnorm": "running"}`` or
            ``{"drop_path": "sampled", "drop_path_seed": 3}`` for Point-MAE and ``{"nonzero": "any"}`` for
            either; they enter the extractor's config, hence the feature cache key and the model files.
    """
    image, point = parse_extractors(name)
    common = {"weights_dir": weights_dir, "random_init": random_init, "seed": seed}
    options = dict(point_options or {})
    image_extractor = _IMAGE[image].factory(**common)
    try:
        point_extractor = _POINT[point].factory(**common, **options)
    except TypeError as error:  # an option the 3D extractor does not have
        raise ValueError(f"point_options {options} do not apply to the {point!r} extractor: {error}") from error
    return image_extractor, point_extractor


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
    device: str = "cpu",
    precision: str = "fp32",
) -> FeaturePipeline:
    """A feature pipeline for extractors (preset or pair) and a preprocessing profile, caching under ``cache_dir``.

    ``point_options`` go to the 3D extractor (see :func:`build_extractors`); ``device`` and ``precision`` are
    where and in which arithmetic the extractors run (see :class:`FeaturePipeline`).
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
        device=device,
        precision=precision,
    )
