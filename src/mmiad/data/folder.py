"""Reader for a user's own data: RGB + organized point-cloud pairs without the MVTec 3D-AD folder tree.

Accepted forms (what ``mmiad predict --input`` takes, and what a quality engineer exports from a line):

* a folder with ``rgb/`` and ``xyz/`` sub-folders paired by file stem, optionally ``gt/`` masks (the layout of one
  MVTec 3D-AD defect folder);
* a flat folder of pairs ``NAME.png`` + ``NAME.tiff``, optionally ``NAME_mask.png``;
* one RGB file and one TIFF given explicitly.

Labels are unknown (-1) unless a mask is present, in which case a sample is anomalous when its mask is non-empty.
"""

from __future__ import annotations

from pathlib import Path

from mmiad.data.errors import DataError
from mmiad.data.formats import DatasetFormat, register_format
from mmiad.data.mvtec3d import RGB_SUFFIXES, XYZ_SUFFIXES, pair_folder
from mmiad.data.sample import LABEL_UNKNOWN, SampleRecord

MASK_SUFFIX = "_mask"


def _record(rgb: Path, xyz: Path, gt: Path | None, category: str, split: str) -> SampleRecord:
    return SampleRecord(
        rgb_path=rgb,
        xyz_path=xyz,
        category=category,
        split=split,
        defect_type="unknown",
        gt_path=gt,
        label=LABEL_UNKNOWN,
        format=Folder.name,
    )


def list_folder_records(
    path: str | Path,
    *,
    xyz_path: str | Path | None = None,
    category: str = "custom",
    split: str = "predict",
    require_both: bool = False,
    errors: list[DataError] | None = None,
) -> list[SampleRecord]:
    """Records for any of the accepted forms (see the module docstring).

    An RGB image without a cloud of its stem is a sample whose cloud is absent: its record names the cloud it
    lacks (``xyz/<stem>.tiff`` or ``<stem>.tiff``), and scoring treats it as one whose cloud is unreadable (the
    fallback scores it from the RGB, flagged degraded). With ``require_both`` it is reported instead.

    Args:
        path: A folder, or an RGB file when ``xyz_path`` is given.
        xyz_path: The TIFF paired with an RGB file ``path``.
        category: Category name attached to the records (used to pick a per-category model).
        split: Split name attached to the records.
        require_both: Report an RGB without its cloud instead of listing it.
        errors: When given, unpaired files are appended here instead of raising.

    Raises:
        DataError: when the path does not exist, holds no pair, or (without ``errors``) has an unpaired file.
    """
    path = Path(path)
    if xyz_path is not None:
        xyz_path = Path(xyz_path)
        for file in (path, xyz_path):
            if not file.is_file():
                raise DataError(file, "file not found")
        return [_record(path, xyz_path, None, category, split)]
    if path.is_file():
        raise DataError(path, "a single file was given; pass a folder, or both an RGB image and its xyz TIFF")
    if not path.is_dir():
        raise DataError(path, "input folder not found")
    found_errors: list[DataError] = []
    if (path / "rgb").is_dir() and (path / "xyz").is_dir():
        gt_dir = path / "gt" if (path / "gt").is_dir() else None
        pairs, found_errors = pair_folder(path / "rgb", path / "xyz", gt_dir)
        if not require_both:  # an RGB alone is a sample whose cloud is absent
            alone = [e for e in found_errors if e.problem.startswith("no matching point cloud")]
            found_errors = [e for e in found_errors if e not in alone]
            for error in alone:
                assert error.path is not None
                mask = gt_dir / f"{error.path.stem}.png" if gt_dir is not None else None
                pairs.append(
                    (error.path, path / "xyz" / f"{error.path.stem}.tiff", mask if mask and mask.is_file() else None)
                )
            pairs.sort(key=lambda pair: pair[0].stem)
    else:
        files = sorted(p for p in path.iterdir() if p.is_file())
        masks = {p.stem[: -len(MASK_SUFFIX)]: p for p in files if p.stem.endswith(MASK_SUFFIX)}
        rgbs = {p.stem: p for p in files if p.suffix.lower() in RGB_SUFFIXES and not p.stem.endswith(MASK_SUFFIX)}
        xyzs = {p.stem: p for p in files if p.suffix.lower() in XYZ_SUFFIXES}
        if require_both or not xyzs:  # a folder without any cloud is not a folder of pairs
            found_errors += [
                DataError(rgbs[s], f"no matching point cloud {s}.tiff") for s in sorted(rgbs.keys() - xyzs)
            ]
        else:  # an RGB alone is a sample whose cloud is absent
            xyzs.update({s: rgbs[s].with_suffix(".tiff") for s in rgbs.keys() - xyzs})
        found_errors += [DataError(xyzs[s], f"no matching RGB image {s}.png") for s in sorted(xyzs.keys() - rgbs)]
        pairs = [(rgbs[s], xyzs[s], masks.get(s)) for s in sorted(rgbs.keys() & xyzs.keys())]
    if found_errors:
        if errors is None:
            raise found_errors[0]
        errors.extend(found_errors)
    if not pairs:
        raise DataError(path, "no RGB + xyz pairs found (expected rgb/ and xyz/ sub-folders, or NAME.png + NAME.tiff)")
    return [_record(rgb, xyz, gt, category, split) for rgb, xyz, gt in pairs]


@register_format("folder")
class Folder(DatasetFormat):
    """A plain folder of pairs (``rgb/`` + ``xyz/``, or ``NAME.png`` + ``NAME.tiff``): one category, ``predict`` only.

    The category is the folder's name; samples are unlabelled unless a mask is present. There is nothing to train
    on: this is the layout ``mmiad predict --input`` reads.
    """

    description = "a plain folder of RGB + xyz pairs (rgb/ + xyz/, or NAME.png + NAME.tiff); predict only"
    detect_priority = 0

    @classmethod
    def detect(cls, root: Path) -> bool:
        """True with ``rgb/`` and ``xyz/`` sub-folders, or any TIFF directly inside."""
        if (root / "rgb").is_dir() and (root / "xyz").is_dir():
            return True
        return any(p.is_file() and p.suffix.lower() in XYZ_SUFFIXES for p in root.iterdir())

    def categories(self) -> list[str]:
        """The folder's name."""
        return [self.root.name]

    def records(self, category: str, split: str, *, errors: list[DataError] | None = None) -> list[SampleRecord]:
        """Every pair under ``predict`` (named ``category``); the other splits are empty."""
        if split != "predict":
            return []
        return list_folder_records(self.root, category=category, split=split, errors=errors)
