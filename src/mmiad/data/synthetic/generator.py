"""Write a synthetic dataset in the exact MVTec 3D-AD layout, or in the native Eyecandies layout.

Every sample has its own random stream, keyed by (seed, category, split, defect folder, index) through
``numpy.random.SeedSequence``; changing how many samples one split has, or which categories are generated, leaves
every other file unchanged, and the same seed and preset give bit-identical files.
"""

from __future__ import annotations

import shutil
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from mmiad.data.io import write_mask, write_rgb, write_xyz
from mmiad.data.sample import GOOD
from mmiad.data.synthetic.defects import DEFECT_TYPES
from mmiad.data.synthetic.eyecandies_layout import SPLIT_FOLDERS as EYECANDIES_SPLITS
from mmiad.data.synthetic.eyecandies_layout import write_eyecandies_sample
from mmiad.data.synthetic.scene import Synthesized, synthesize
from mmiad.data.synthetic.shapes import CATEGORIES

LAYOUTS = ("mvtec3d", "eyecandies")
MIN_IMAGE_SIDE = 48
"""Smaller images leave no room for the object inside the 10-pixel border strips the plane fit uses."""


@dataclass(frozen=True)
class SynthConfig:
    """What to generate.

    Attributes:
        categories: Object categories (see :data:`CATEGORIES`).
        image_size: (height, width) in pixels.
        n_train: Good samples in ``train``.
        n_validation: Good samples in ``validation``.
        n_test_good: Good samples in ``test``.
        n_per_defect: Samples per defect folder in ``test``.
        defects: Defect types (see :data:`DEFECT_TYPES`), one ``test`` folder each.
    """

    categories: tuple[str, ...]
    image_size: tuple[int, int]
    n_train: int
    n_validation: int
    n_test_good: int
    n_per_defect: int
    defects: tuple[str, ...]

    def __post_init__(self) -> None:
        unknown = [c for c in self.categories if c not in CATEGORIES]
        if unknown or not self.categories:
            raise ValueError(f"unknown or no categories {unknown or list(self.categories)}; choose from {CATEGORIES}")
        unknown = [d for d in self.defects if d not in DEFECT_TYPES]
        if unknown:
            raise ValueError(f"unknown defect types {unknown}; choose from {DEFECT_TYPES}")
        if len(set(self.categories)) != len(self.categories) or len(set(self.defects)) != len(self.defects):
            raise ValueError("categories and defects must not repeat")
        if len(self.image_size) != 2 or min(self.image_size) < MIN_IMAGE_SIDE:
            raise ValueError(
                f"image_size must be (height, width) with both sides >= {MIN_IMAGE_SIDE}, got {self.image_size}"
            )
        for name in ("n_train", "n_validation", "n_test_good", "n_per_defect"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @property
    def total(self) -> int:
        """Number of samples written."""
        per_category = self.n_train + self.n_validation + self.n_test_good + self.n_per_defect * len(self.defects)
        return per_category * len(self.categories)


PRESETS: dict[str, SynthConfig] = {
    "tiny": SynthConfig(
        categories=("puck", "block"),
        image_size=(64, 64),
        n_train=6,
        n_validation=2,
        n_test_good=2,
        n_per_defect=1,
        defects=("bump", "stain", "combined", "crossmodal"),
    ),
    "demo": SynthConfig(
        categories=CATEGORIES,
        image_size=(224, 224),
        n_train=20,
        n_validation=5,
        n_test_good=6,
        n_per_defect=3,
        defects=("bump", "crack", "stain", "contamination", "combined", "crossmodal"),
    ),
}


def sample_rng(seed: int, category: str, split: str, folder: str, index: int) -> np.random.Generator:
    """The random stream of one sample, independent of every other sample's."""
    key = (*(zlib.crc32(name.encode()) for name in (category, split, folder)), index)
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def _plan(config: SynthConfig) -> Iterator[tuple[str, str, str, int]]:
    """(category, split, folder, index) of every sample, in writing order."""
    for category in config.categories:
        for split, folder, count in (
            ("train", GOOD, config.n_train),
            ("validation", GOOD, config.n_validation),
            ("test", GOOD, config.n_test_good),
            *(("test", defect, config.n_per_defect) for defect in config.defects),
        ):
            for index in range(count):
                yield category, split, folder, index


def generate_sample(config: SynthConfig, seed: int, category: str, split: str, folder: str, index: int) -> Synthesized:
    """Generate (without writing) the sample that :func:`generate_dataset` writes at that place."""
    rng = sample_rng(seed, category, split, folder, index)
    return synthesize(category, config.image_size, rng, None if folder == GOOD else folder)


def resolve_config(
    preset: str = "tiny",
    *,
    categories: Sequence[str] | None = None,
    image_size: int | tuple[int, int] | None = None,
    n_train: int | None = None,
    n_validation: int | None = None,
    n_test_good: int | None = None,
    n_per_defect: int | None = None,
    defects: Sequence[str] | None = None,
) -> SynthConfig:
    """A preset with the given overrides applied (None keeps the preset's value).

    Raises:
        ValueError: for an unknown preset, category or defect type, or an invalid size or count.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    overrides: dict[str, Any] = {
        "categories": tuple(categories) if categories is not None else None,
        "image_size": tuple(int(x) for x in image_size) if image_size is not None else None,
        "n_train": n_train,
        "n_validation": n_validation,
        "n_test_good": n_test_good,
        "n_per_defect": n_per_defect,
        "defects": tuple(defects) if defects is not None else None,
    }
    return replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})


def generate_dataset(
    out: str | Path,
    preset: str = "tiny",
    seed: int = 0,
    *,
    categories: Sequence[str] | None = None,
    image_size: int | tuple[int, int] | None = None,
    n_train: int | None = None,
    n_validation: int | None = None,
    n_test_good: int | None = None,
    n_per_defect: int | None = None,
    defects: Sequence[str] | None = None,
    layout: str = "mvtec3d",
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write a synthetic multimodal anomaly-detection dataset in the MVTec 3D-AD (or Eyecandies) layout.

    Layout ``mvtec3d``: ``<out>/<category>/{train,validation}/good/{rgb,xyz}/NNN.{png,tiff}`` and
    ``<out>/<category>/test/<defect>/{rgb,xyz,gt}/NNN.{png,tiff,png}`` (``test/good`` has no ``gt``).
    Layout ``eyecandies``: ``<out>/<category>/{train,val,test_public}/data/NNN_{image_4.png,depth.png,
    info_depth.yaml,pose.txt}`` plus ``NNN_mask.png`` in ``test_public`` (see
    :mod:`~mmiad.data.synthetic.eyecandies_layout`); the same samples, numbered per split.

    Args:
        out: Dataset root; created when missing.
        preset: ``tiny`` (unit tests, ~1 s) or ``demo`` (a meaningful benchmark, well under a minute).
        seed: Same seed and settings give bit-identical files; another seed gives other data.
        categories: Override the preset's categories.
        image_size: Override the size: one int for square images or (height, width).
        n_train: Override the number of train samples per category.
        n_validation: Override the number of validation samples per category.
        n_test_good: Override the number of good test samples per category.
        n_per_defect: Override the number of samples per defect folder.
        defects: Override the defect types.
        layout: ``mvtec3d`` or ``eyecandies``.
        overwrite: Replace category folders that already exist under ``out``; without it, existing
            non-empty category folders are an error, so stale files from another run cannot mix in.
        progress: Show a progress bar.

    Returns:
        The dataset root.

    Raises:
        ValueError: for bad settings, or existing category folders without ``overwrite``.
    """
    config = resolve_config(
        preset,
        categories=categories,
        image_size=image_size,
        n_train=n_train,
        n_validation=n_validation,
        n_test_good=n_test_good,
        n_per_defect=n_per_defect,
        defects=defects,
    )
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {LAYOUTS}")
    root = Path(out)
    for category in config.categories:
        folder = root / category
        if folder.is_dir() and any(folder.iterdir()):
            if not overwrite:
                raise ValueError(f"{folder} already exists and is not empty; pass overwrite=True to replace it")
            shutil.rmtree(folder)
    root.mkdir(parents=True, exist_ok=True)

    from tqdm.auto import tqdm

    numbers: dict[tuple[str, str], int] = {}
    with tqdm(total=config.total, desc="synthesizing", unit="sample", disable=not progress) as bar:
        for category, split, defect, index in _plan(config):
            generated = generate_sample(config, seed, category, split, defect, index)
            if layout == "eyecandies":
                number = numbers.get((category, split), 0)
                numbers[(category, split)] = number + 1
                data_dir = root / category / EYECANDIES_SPLITS[split] / "data"
                write_eyecandies_sample(data_dir, f"{number:03d}", generated, with_mask=split == "test")
            else:
                _write(root / category / split / defect, f"{index:03d}", generated)
            bar.update(1)
    return root


def _write(folder: Path, stem: str, generated: Synthesized) -> None:
    write_rgb(folder / "rgb" / f"{stem}.png", generated.sample.rgb)
    write_xyz(folder / "xyz" / f"{stem}.tiff", generated.sample.xyz)
    if generated.gt_mask is not None:
        write_mask(folder / "gt" / f"{stem}.png", generated.gt_mask)
