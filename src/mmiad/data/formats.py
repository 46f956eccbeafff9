"""Dataset formats behind one interface, found by name or detected from the root, and loading one sample.

A format knows one layout on disk: it lists the categories, lists the records of a category's split, reads a
record's RGB, point cloud and mask, and declares every file those reads open (:meth:`DatasetFormat.sample_files`):
the feature cache keys on the declared files, so an edited side file (an Eyecandies pose) is never served stale
features. A format that overrides a reader must declare its files too, or it is refused when it registers.
Everything that walks a dataset (training, testing, reports, stored-map evaluation, the benchmarks) goes through
:func:`open_dataset`, so a new layout is one module in ``mmiad/data`` that registers a :class:`DatasetFormat`
subclass, plus one import line in ``mmiad/data/__init__.py``. This module imports no format.

Splits have mmiad's names everywhere: ``train`` (nominal), ``validation`` (nominal, held out for thresholds),
``test`` (labelled) and ``predict`` (unlabelled); a format maps them to its own folders (Eyecandies: ``val``,
``test_public``, ``test_private``). A record names its format (``SampleRecord.format``), so one record is
enough to read a sample wherever it came from.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar, TypeVar

import numpy as np

from mmiad.data.errors import DataError
from mmiad.data.io import read_mask, read_rgb, read_xyz, valid_points
from mmiad.data.sample import LABEL_UNKNOWN, Sample, SampleRecord
from mmiad.utils.registry import Registry

SPLITS = ("train", "validation", "test", "predict")
AUTO = "auto"


class DatasetFormat(ABC):
    """One dataset layout: listing (per instance, on a root) and reading (per record, no root needed).

    Class attributes:
        name: What ``--format`` takes and what records carry in ``SampleRecord.format``.
        description: One line for ``--help``.
        detect_priority: Formats are tried from the highest; a more specific layout must come first.
        background_removed: True when reading already removes the background, as the official converters do for
            Eyecandies; the offline preprocessing profile (plane removal, clustering, padding) is then skipped,
            since the official code never applies it to such data.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    detect_priority: ClassVar[int] = 0
    background_removed: ClassVar[bool] = False

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @classmethod
    @abstractmethod
    def detect(cls, root: Path) -> bool:
        """True when ``root`` looks like this layout (cheap: a few directory listings)."""

    @abstractmethod
    def categories(self) -> list[str]:
        """The categories under the root, sorted."""

    @abstractmethod
    def records(self, category: str, split: str, *, errors: list[DataError] | None = None) -> list[SampleRecord]:
        """The samples of one category and split (empty when the split is absent).

        Args:
            category: A name from :meth:`categories`.
            split: One of :data:`SPLITS`.
            errors: When given, incomplete or unpaired samples are appended here and skipped; otherwise the first
                one is raised.

        Raises:
            DataError: for an unknown category or split.
        """

    @classmethod
    def sample_files(cls, record: SampleRecord) -> dict[str, Path]:
        """Every file the readers open for ``record``, by role (``rgb``, ``xyz``, ``gt``, side files).

        What the features depend on is every file but the ground truth (:func:`feature_files`); a format whose
        readers open more than ``rgb_path``, ``xyz_path`` and ``gt_path`` must override this (enforced by
        :func:`register_format`), so that nothing a sample is computed from escapes the feature cache's key.
        """
        files = {"rgb": Path(record.rgb_path), "xyz": Path(record.xyz_path)}
        if record.gt_path is not None:
            files["gt"] = Path(record.gt_path)
        return files

    @classmethod
    def read_rgb(cls, record: SampleRecord) -> np.ndarray:
        """H×W×3 uint8 image."""
        return read_rgb(record.rgb_path)

    @classmethod
    def read_xyz(cls, record: SampleRecord) -> np.ndarray:
        """H×W×3 float32 organized cloud in metres, invalid points exactly zero."""
        return read_xyz(record.xyz_path)

    @classmethod
    def read_mask(cls, record: SampleRecord) -> np.ndarray | None:
        """H×W bool ground truth, or None when the record has none."""
        return read_mask(record.gt_path) if record.gt_path is not None else None


FormatT = TypeVar("FormatT", bound=type[DatasetFormat])
_READERS = ("read_rgb", "read_xyz", "read_mask")
#: The role whose file does not change a sample's features (the ground truth is read again at every use).
GROUND_TRUTH = "gt"
_FORMATS: Registry[type[DatasetFormat]] = Registry(
    "dataset format", order=lambda name, cls: (-cls.detect_priority, name)
)


def register_format(name: str) -> Callable[[FormatT], FormatT]:
    """Class decorator making a :class:`DatasetFormat` available as ``--format name`` and to detection."""

    def decorate(cls: FormatT) -> FormatT:
        own_readers = [reader for reader in _READERS if _overrides(cls, reader)]
        if own_readers and not _overrides(cls, "sample_files"):
            raise TypeError(
                f"dataset format {name!r} overrides {', '.join(own_readers)} but not sample_files: declare every "
                "file its readers open, or the feature cache would serve stale features when one of them changes"
            )
        _FORMATS.register(name, cls)
        cls.name = name
        return cls

    return decorate


def _overrides(cls: type[DatasetFormat], method: str) -> bool:
    """True when ``cls`` (or a parent below :class:`DatasetFormat`) redefines the classmethod ``method``."""
    return getattr(cls, method).__func__ is not getattr(DatasetFormat, method).__func__


def available_formats() -> list[str]:
    """Registered format names, in detection order."""
    return _FORMATS.names()


def get_format(name: str) -> type[DatasetFormat]:
    """The format class called ``name``, with an error listing the known ones."""
    return _FORMATS.get(name)


def formats_help() -> str:
    """The ``--format`` help text, from the registry."""
    described = "; ".join(f"{n}: {_FORMATS[n].description}" for n in available_formats())
    return f"dataset layout, detected from the root by default ({AUTO}); {described}"


def detect_format(root: str | Path) -> type[DatasetFormat]:
    """The first registered format (by priority) that recognises ``root``.

    Raises:
        DataError: when the root is missing or no format recognises it.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "dataset root not found")
    for name in available_formats():
        if _FORMATS[name].detect(root):
            return _FORMATS[name]
    raise DataError(root, f"not a dataset of a known layout ({', '.join(available_formats())}); pass --format")


def open_dataset(root: str | Path, format: str | None = None) -> DatasetFormat:
    """The dataset at ``root`` in the named format, or the detected one when ``format`` is None or ``auto``."""
    cls = detect_format(root) if format in (None, AUTO) else get_format(str(format))
    return cls(root)


def feature_files(record: SampleRecord) -> list[Path]:
    """The files a record's features are computed from, in the format's order: its declared files but the mask.

    For MVTec 3D-AD and plain folders this is ``[rgb, xyz]``, the feature cache's key since the first release
    (existing caches stay valid); Eyecandies adds ``info_depth.yaml`` and ``pose.txt``.
    """
    return [path for role, path in get_format(record.format).sample_files(record).items() if role != GROUND_TRUTH]


def load_sample(record: SampleRecord) -> Sample:
    """Load the arrays of a record through its format and check that they fit together.

    Raises:
        DataError: naming the file when a file is unreadable, sizes disagree or the cloud has no valid point.
    """
    reader = get_format(record.format)
    xyz = reader.read_xyz(record)
    rgb = reader.read_rgb(record)
    return assemble_sample(record, rgb, xyz)


def assemble_sample(record: SampleRecord, rgb: np.ndarray, xyz: np.ndarray) -> Sample:
    """The sample of a record whose RGB and cloud are read already: checked, with its mask and label.

    Raises:
        DataError: when the sizes disagree, the cloud has no valid point or the mask is unreadable or misfit.
    """
    reader = get_format(record.format)
    if rgb.shape[:2] != xyz.shape[:2]:
        raise DataError(
            record.xyz_path,
            f"size {xyz.shape[1]}×{xyz.shape[0]} does not match RGB {record.rgb_path.name} "
            f"({rgb.shape[1]}×{rgb.shape[0]}); RGB and point cloud must be pixel-registered",
        )
    valid = valid_points(xyz)
    if not valid.any():
        raise DataError(record.xyz_path, "the point cloud has no valid (non-zero, finite) point")
    gt_mask = reader.read_mask(record)
    if gt_mask is not None and gt_mask.shape != rgb.shape[:2]:
        raise DataError(record.gt_path, f"mask size {gt_mask.shape[::-1]} does not match RGB {rgb.shape[1::-1]}")
    if gt_mask is None and record.label == 0:
        gt_mask = np.zeros(rgb.shape[:2], dtype=bool)
    label = record.label
    if label == LABEL_UNKNOWN and gt_mask is not None:
        label = int(gt_mask.any())
    return Sample(
        rgb=rgb,
        xyz=xyz,
        valid=valid,
        gt_mask=gt_mask,
        label=label,
        category=record.category,
        defect_type=record.defect_type,
        record=record,
    )
