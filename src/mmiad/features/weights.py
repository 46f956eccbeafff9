"""Where backbone weights live, which released files we know, and the builders that turn a preset into an extractor.

Nothing is ever downloaded: the library runs offline. The user puts the released files into one weights folder
(``--weights-dir``, else ``$MMIAD_WEIGHTS_DIR``, else ``~/.cache/mmiad/weights``), and a missing file produces an
error that says which file to put where and where to get it. Random weights exist only for tests and smoke runs,
behind an explicit flag and a warning, because features from a random backbone look plausible but are useless.

Checksums: a size or SHA-256 is listed only where it was confirmed from a published source; ``None`` means
"not verified", never a guess. Point-MAE's ``pretrain.pth`` (348,288,755 bytes, sha256 ``27ded932…``) is recorded
by anomalib's CFM port and by independent reproduction scripts; timm's ``model.safetensors`` SHA-256 is the Git
LFS object id shown on its Hugging Face page. The official DINO/DINOv2 ``.pth`` files publish no checksum.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmiad.data.errors import DataError
from mmiad.features.pointmae import (
    POINTMAE_PRESETS,
    PointMaeEncoder,
    PointMaeExtractor,
    load_pointmae_weights,
    official_layers,
)
from mmiad.features.registry import register_image_extractor, register_point_extractor
from mmiad.features.vit import VIT_PRESETS, VisionTransformer, VitExtractor, load_vit_weights
from mmiad.utils.hashing import file_sha256

ENV_VAR = "MMIAD_WEIGHTS_DIR"
DEFAULT_DIR = Path("~/.cache/mmiad/weights")


@dataclass(frozen=True)
class KnownFile:
    """One accepted file name (relative to the weights folder) with its verified size and hash, if known."""

    relpath: str
    size: int | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class WeightsEntry:
    """A released checkpoint: the file names accepted for it and where a user can obtain it."""

    name: str
    files: tuple[KnownFile, ...]
    source: str


_DINO = "https://dl.fbaipublicfiles.com/dino"
_DINOV2 = "https://dl.fbaipublicfiles.com/dinov2"

#: The checkpoints the presets know about.
KNOWN_WEIGHTS: dict[str, WeightsEntry] = {
    entry.name: entry
    for entry in (
        WeightsEntry(
            "dino_vitb8",
            (KnownFile("dino_vitbase8_pretrain.pth"),),
            f"{_DINO}/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth",
        ),
        WeightsEntry(
            "timm_vit_base_patch8_224_dino",
            (
                KnownFile(
                    "vit_base_patch8_224.dino/model.safetensors",
                    sha256="01be14b99784a4c0970a5703214513588daf27014e908ac7ea08967b7bd80f5f",
                ),
                KnownFile("vit_base_patch8_224.dino/pytorch_model.bin"),
            ),
            "https://huggingface.co/timm/vit_base_patch8_224.dino (model.safetensors, into a folder of that name)",
        ),
        WeightsEntry(
            "dino_vits8",
            (KnownFile("dino_deitsmall8_pretrain.pth"),),
            f"{_DINO}/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth",
        ),
        WeightsEntry(
            "dino_vitb16",
            (KnownFile("dino_vitbase16_pretrain.pth"),),
            f"{_DINO}/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
        ),
        WeightsEntry(
            "dinov2_vits14",
            (KnownFile("dinov2_vits14_pretrain.pth"),),
            f"{_DINOV2}/dinov2_vits14/dinov2_vits14_pretrain.pth",
        ),
        WeightsEntry(
            "dinov2_vitb14",
            (KnownFile("dinov2_vitb14_pretrain.pth"),),
            f"{_DINOV2}/dinov2_vitb14/dinov2_vitb14_pretrain.pth",
        ),
        # BTF (3D-ADS) calls timm.create_model("wide_resnet50_2", pretrained=True) with an unpinned timm; every
        # timm of its time (2022, 0.5-0.6) resolves that to timm's own RA/CutMix/Mixup-trained weights
        # (wide_resnet50_racm-8234f177.pth, on the HF hub as wide_resnet50_2.racm_in1k since timm 0.9), not
        # torchvision's. They are preferred when several files are present; the others remain usable.
        WeightsEntry(
            "wide_resnet50_2",
            (
                KnownFile("wide_resnet50_2.racm_in1k/model.safetensors"),
                KnownFile("wide_resnet50_racm-8234f177.pth"),
                KnownFile("wide_resnet50_2-95faca4d.pth"),
                KnownFile("wide_resnet50_2.tv_in1k/model.safetensors"),
            ),
            "https://huggingface.co/timm/wide_resnet50_2.racm_in1k (model.safetensors, into a folder of that name; "
            "the weights BTF's official code loads through timm), or the same weights as "
            "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-weights/"
            "wide_resnet50_racm-8234f177.pth; torchvision's wide_resnet50_2-95faca4d.pth also loads but is not "
            "what the published BTF numbers used",
        ),
        WeightsEntry(
            "pointmae",
            tuple(
                KnownFile(name, 348_288_755, "27ded932bb0a2625d5a8eb006df199b2578598c774aee6d86b985300b6a5fd20")
                for name in ("pointmae_pretrain.pth", "pretrain.pth")
            ),
            "https://github.com/Pang-Yatian/Point-MAE/releases/download/main/pretrain.pth",
        ),
        # GLFM's Stage-I output (a plain state_dict with its classify.* head), for --set adaptation=released.
        WeightsEntry(
            "glfm_adapted",
            (KnownFile("pointmae_adapted.pth"),),
            "the Baidu link in the README of https://github.com/hustCYQ/GLFM-Multi-class-3DAD",
        ),
    )
}


class MissingWeightsError(DataError):
    """The weights file a preset needs is not in the weights folder."""


def weights_dir(flag: str | Path | None = None) -> Path:
    """The weights folder: the CLI flag, else ``$MMIAD_WEIGHTS_DIR``, else ``~/.cache/mmiad/weights``."""
    chosen = flag if flag is not None else os.environ.get(ENV_VAR) or DEFAULT_DIR
    return Path(chosen).expanduser()


def _find(entry: WeightsEntry, folder: Path) -> tuple[Path, KnownFile] | None:
    for known in entry.files:
        path = folder / known.relpath
        if path.is_file():
            size = path.stat().st_size
            if known.size is not None and size != known.size:
                raise DataError(path, f"size {size} bytes, expected {known.size} (truncated or wrong download?)")
            return path, known
    return None


def _missing_message(entries: list[WeightsEntry], folder: Path) -> str:
    options = "; or ".join(
        f"{' or '.join(repr(f.relpath) for f in entry.files)} (from {entry.source})" for entry in entries
    )
    return (
        f"weights not found: put {options} into {folder} "
        f"(choose the folder with --weights-dir or ${ENV_VAR}); nothing is downloaded automatically"
    )


def resolve_weights(name: str | tuple[str, ...], weights_dir_: str | Path | None = None) -> Path:
    """Path of the first present file among the named checkpoints.

    Raises:
        ValueError: For an unknown checkpoint name.
        MissingWeightsError: If none is present, saying which file to put where.
        DataError: If a present file has the wrong size.
    """
    names = (name,) if isinstance(name, str) else tuple(name)
    unknown = [n for n in names if n not in KNOWN_WEIGHTS]
    if unknown:
        raise ValueError(f"unknown weights {unknown}; known: {sorted(KNOWN_WEIGHTS)}")
    folder = weights_dir(weights_dir_)
    entries = [KNOWN_WEIGHTS[n] for n in names]
    for entry in entries:
        found = _find(entry, folder)
        if found is not None:
            return found[0]
    raise MissingWeightsError(folder, _missing_message(entries, folder))


def _weights_id(path: Path) -> str:
    """SHA-256 of the file, warning (not failing) when it differs from a published hash: re-saved copies exist."""
    digest = file_sha256(path)
    for entry in KNOWN_WEIGHTS.values():
        for known in entry.files:
            if known.sha256 and path.name == Path(known.relpath).name and digest != known.sha256:
                warnings.warn(f"{path}: sha256 {digest} differs from the published {known.sha256}", stacklevel=3)
    return digest


def _random_init_warning(what: str, seed: int) -> None:
    warnings.warn(
        f"{what}: using RANDOM weights (seed {seed}); features are meaningless for anomaly detection",
        stacklevel=3,
    )


def build_image_extractor(
    preset: str,
    *,
    weights_dir: str | Path | None = None,
    random_init: bool = False,
    seed: int = 0,
    keep_blocks: int | None = None,
) -> VitExtractor:
    """A frozen ViT extractor for a named preset, loaded from the weights folder.

    Args:
        preset: A key of :data:`~mmiad.features.vit.VIT_PRESETS`.
        weights_dir: The weights folder (see :func:`weights_dir`).
        random_init: Use seeded random weights instead of a checkpoint (tests only; warns).
        seed: Seed of the random weights.
        keep_blocks: Override the preset's layer pruning.
    """
    if preset not in VIT_PRESETS:
        raise ValueError(f"unknown image extractor preset {preset!r}; known: {sorted(VIT_PRESETS)}")
    spec = VIT_PRESETS[preset]
    if keep_blocks is not None:
        spec = replace(spec, keep_blocks=keep_blocks)
    if random_init:
        _random_init_warning(preset, seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = VisionTransformer(spec)
            nn.init.trunc_normal_(model.pos_embed, std=0.02)
            nn.init.trunc_normal_(model.cls_token, std=0.02)
        return VitExtractor(model, f"random-{seed}")
    path = resolve_weights(spec.weights, weights_dir)
    model = VisionTransformer(spec)
    load_vit_weights(model, path)
    return VitExtractor(model, _weights_id(path))


def build_point_extractor(
    preset: str = "pointmae",
    *,
    weights_dir: str | Path | None = None,
    random_init: bool = False,
    seed: int = 0,
    keep_blocks: int | None = None,
    num_group: int | None = None,
    group_size: int | None = None,
    fps_backend: str = "auto",
    batchnorm: str = "cloud",
    drop_path: str = "expected",
    drop_path_seed: int = 0,
    nonzero: str = "all",
    regroup: bool = False,
) -> PointMaeExtractor:
    """A frozen Point-MAE extractor for a named preset, loaded from the weights folder.

    Args:
        preset: A key of :data:`~mmiad.features.pointmae.POINTMAE_PRESETS`.
        weights_dir: The weights folder (see :func:`weights_dir`).
        random_init: Use seeded random weights instead of a checkpoint (tests only; warns).
        seed: Seed of the random weights.
        keep_blocks: Override pruning; the output layers follow the official choice for that depth.
        num_group: Override the number of FPS centres (small values make tests fast).
        group_size: Override the points per group.
        fps_backend: ``"auto"``, ``"fpsample"`` or ``"numpy"`` (identical results).
        batchnorm: ``"cloud"`` (default: per-cloud statistics, as the official scripts) or ``"running"``.
        drop_path: ``"expected"`` (default: identity) or ``"sampled"`` (the official random DropPath, seeded).
        drop_path_seed: Seed of the sampled DropPath.
        nonzero: ``"all"`` (default, official: a point needs three non-zero coordinates) or ``"any"``.
        regroup: GLFM's two-step smoothing of the group features (see :class:`PointMaeExtractor`).
    """
    if preset not in POINTMAE_PRESETS:
        raise ValueError(f"unknown point extractor preset {preset!r}; known: {sorted(POINTMAE_PRESETS)}")
    spec = POINTMAE_PRESETS[preset]
    if keep_blocks is not None:
        spec = replace(spec, keep_blocks=keep_blocks, layers=official_layers(keep_blocks))
    spec = replace(spec, num_group=num_group or spec.num_group, group_size=group_size or spec.group_size)
    options: dict[str, Any] = {
        "drop_path": drop_path,
        "drop_path_seed": drop_path_seed,
        "nonzero": nonzero,
        "regroup": regroup,
    }
    if random_init:
        _random_init_warning(preset, seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = PointMaeEncoder(spec.keep_blocks, spec.layers, batchnorm=batchnorm)
        return PointMaeExtractor(model, spec, f"random-{seed}", fps_backend, **options)
    path = resolve_weights(spec.weights, weights_dir)
    model = PointMaeEncoder(spec.keep_blocks, spec.layers, batchnorm=batchnorm)
    load_pointmae_weights(model, path)
    return PointMaeExtractor(model, spec, _weights_id(path), fps_backend, **options)


def _register_presets() -> None:
    """Every ViT and Point-MAE preset becomes a registered extractor of the same name."""
    for name, vit in VIT_PRESETS.items():
        pruned = f", {vit.keep_blocks} blocks" if vit.keep_blocks != vit.depth else ""
        register_image_extractor(
            name, partial(build_image_extractor, name), f"{name} ({vit.embed_dim}-d{pruned})", needs_weights=True
        )
    for name, point in POINTMAE_PRESETS.items():
        register_point_extractor(
            name,
            partial(build_point_extractor, name),
            f"Point-MAE {point.num_group}×{point.group_size}, layers {list(point.layers)}",
            needs_weights=True,
        )


_register_presets()
