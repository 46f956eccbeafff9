"""Reader for the MVTec 3D-AD folder layout (also what ``mmiad synth`` writes).

Layout: ``<root>/<category>/{train,validation}/good/{rgb,xyz}/NNN.{png,tiff}`` and
``<root>/<category>/test/<defect>/{rgb,xyz,gt}/NNN.{png,tiff,png}``. Files are paired by stem, not by sorted
position as the official code does, so one missing file cannot silently shift every pair after it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from mmiad.data.errors import DataError
from mmiad.data.formats import DatasetFormat, register_format
from mmiad.data.sample import GOOD, LABEL_ANOMALOUS, LABEL_NORMAL, SampleRecord

SPLITS = ("train", "validation", "test")
RGB_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
XYZ_SUFFIXES = (".tiff", ".tif")


def _files_by_stem(folder: Path, suffixes: Iterable[str]) -> dict[str, Path]:
    suffixes = tuple(suffixes)
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in suffixes}


def pair_folder(
    rgb_dir: Path, xyz_dir: Path, gt_dir: Path | None = None
) -> tuple[list[tuple[Path, Path, Path | None]], list[DataError]]:
    """Pair ``rgb/`` and ``xyz/`` files by stem; unpaired files are returned as errors, not dropped silently."""
    rgbs = _files_by_stem(rgb_dir, RGB_SUFFIXES)
    xyzs = _files_by_stem(xyz_dir, XYZ_SUFFIXES)
    gts = _files_by_stem(gt_dir, RGB_SUFFIXES) if gt_dir is not None else {}
    errors = [DataError(rgbs[s], f"no matching point cloud {s}.tiff in {xyz_dir}") for s in sorted(rgbs.keys() - xyzs)]
    errors += [DataError(xyzs[s], f"no matching RGB image {s}.png in {rgb_dir}") for s in sorted(xyzs.keys() - rgbs)]
    pairs = [(rgbs[s], xyzs[s], gts.get(s)) for s in sorted(rgbs.keys() & xyzs.keys())]
    return pairs, errors


def list_categories(root: str | Path) -> list[str]:
    """Categories under ``root``: sub-folders that contain a ``train`` or ``test`` folder."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "dataset root not found")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and ((p / "train").is_dir() or (p / "test").is_dir()))


def list_records(
    root: str | Path, category: str, split: str, *, errors: list[DataError] | None = None
) -> list[SampleRecord]:
    """All samples of one category and split, sorted by defect type then stem.

    Args:
        root: Dataset root.
        category: Category folder name.
        split: ``train``, ``validation`` or ``test``.
        errors: When given, unpaired files are appended here instead of raising.

    Raises:
        DataError: for an unknown category or split, or (when ``errors`` is None) an unpaired file.
    """
    if split not in SPLITS:
        raise DataError(None, f"unknown split {split!r}; expected one of {SPLITS}")
    split_dir = Path(root) / category / split
    if not (Path(root) / category).is_dir():
        raise DataError(Path(root) / category, f"category {category!r} not found")
    if not split_dir.is_dir():
        return []
    records: list[SampleRecord] = []
    for defect_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        defect = defect_dir.name
        gt_dir = defect_dir / "gt" if defect != GOOD else None
        pairs, pair_errors = pair_folder(defect_dir / "rgb", defect_dir / "xyz", gt_dir)
        if pair_errors and errors is None:
            raise pair_errors[0]
        if errors is not None:
            errors.extend(pair_errors)
        label = LABEL_NORMAL if defect == GOOD else LABEL_ANOMALOUS
        for rgb_path, xyz_path, gt_path in pairs:
            if label == LABEL_ANOMALOUS and gt_path is None:
                problem = f"defective sample has no ground-truth mask {defect_dir / 'gt' / (rgb_path.stem + '.png')}"
                if errors is None:
                    raise DataError(rgb_path, problem)
                errors.append(DataError(rgb_path, problem))
            records.append(
                SampleRecord(
                    rgb_path=rgb_path,
                    xyz_path=xyz_path,
                    category=category,
                    split=split,
                    defect_type=defect,
                    gt_path=gt_path if label == LABEL_ANOMALOUS else None,
                    label=label,
                )
            )
    return records


def looks_like_mvtec3d(root: str | Path) -> bool:
    """True when some ``<root>/<category>/<split>/<defect>/`` folder holds ``rgb/`` or ``xyz/``."""
    root = Path(root)
    for category in (p for p in root.iterdir() if p.is_dir()):
        for split in SPLITS:
            split_dir = category / split
            if split_dir.is_dir() and any((d / "rgb").is_dir() or (d / "xyz").is_dir() for d in split_dir.iterdir()):
                return True
    return False


@register_format("mvtec3d")
class MVTec3D(DatasetFormat):
    """``<root>/<category>/{train,validation,test}/<defect>/{rgb,xyz,gt}/NNN.*`` (also what ``mmiad synth`` writes)."""

    description = "MVTec 3D-AD folders (<category>/<split>/<defect>/{rgb,xyz,gt})"
    detect_priority = 10

    @classmethod
    def detect(cls, root: Path) -> bool:
        """See :func:`looks_like_mvtec3d`."""
        return looks_like_mvtec3d(root)

    def categories(self) -> list[str]:
        """See :func:`list_categories`."""
        return list_categories(self.root)

    def records(self, category: str, split: str, *, errors: list[DataError] | None = None) -> list[SampleRecord]:
        """See :func:`list_records`; MVTec 3D-AD has no unlabelled split, so ``predict`` is empty."""
        if split == "predict":
            if not (self.root / category).is_dir():
                raise DataError(self.root / category, f"category {category!r} not found")
            return []
        return list_records(self.root, category, split, errors=errors)
