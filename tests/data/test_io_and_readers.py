from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from mmiad.data.errors import DataError
from mmiad.data.folder import list_folder_records
from mmiad.data.formats import load_sample
from mmiad.data.io import read_mask, read_xyz, write_mask, write_rgb, write_xyz
from mmiad.data.mvtec3d import list_categories, list_records
from mmiad.data.sample import SampleRecord


def _cloud(h: int = 8, w: int = 10) -> np.ndarray:
    xyz = np.zeros((h, w, 3), np.float32)
    xyz[..., 2] = 0.4
    xyz[..., 0] = np.linspace(-0.01, 0.01, w)
    return xyz


def _write_pair(folder: Path, stem: str, h: int = 8, w: int = 10, gt: np.ndarray | None = None) -> None:
    write_rgb(folder / "rgb" / f"{stem}.png", np.full((h, w, 3), 120, np.uint8))
    write_xyz(folder / "xyz" / f"{stem}.tiff", _cloud(h, w))
    if gt is not None:
        write_mask(folder / "gt" / f"{stem}.png", gt)


def test_xyz_nan_becomes_invalid_and_mask_class_ids_are_anomalous(tmp_path) -> None:
    xyz = _cloud()
    xyz[0, 0] = np.nan
    tifffile.imwrite(tmp_path / "c.tiff", xyz, photometric="rgb")
    loaded = read_xyz(tmp_path / "c.tiff")
    assert np.array_equal(loaded[0, 0], [0, 0, 0]) and loaded.dtype == np.float32
    mask = np.zeros((8, 10), np.uint8)
    mask[2, 3], mask[4, 4] = 253, 255
    Image.fromarray(mask).save(tmp_path / "gt.png")
    assert read_mask(tmp_path / "gt.png").sum() == 2


@pytest.mark.parametrize(
    ("array", "problem"),
    [
        (np.zeros((8, 10), np.float32), "H×W×3"),
        (np.zeros((8, 10, 3), np.int16), "dtype"),
    ],
)
def test_bad_xyz_names_file_and_problem(tmp_path, array, problem) -> None:
    path = tmp_path / "bad.tiff"
    tifffile.imwrite(path, array, photometric="rgb" if array.ndim == 3 else None)
    with pytest.raises(DataError, match=problem) as info:
        read_xyz(path)
    assert info.value.path == path


def test_truncated_and_mismatched_and_empty_samples(tmp_path) -> None:
    _write_pair(tmp_path, "000")
    truncated = tmp_path / "xyz" / "000.tiff"
    truncated.write_bytes(truncated.read_bytes()[:50])
    record = SampleRecord(tmp_path / "rgb" / "000.png", truncated, "c", "test")
    with pytest.raises(DataError, match="unreadable or truncated"):
        load_sample(record)
    write_xyz(truncated, _cloud(8, 12))
    with pytest.raises(DataError, match="does not match RGB"):
        load_sample(record)
    write_xyz(truncated, np.zeros((8, 10, 3), np.float32))
    with pytest.raises(DataError, match="no valid"):
        load_sample(record)


def test_mvtec_reader_pairs_by_stem_and_reports_unpaired(tmp_path) -> None:
    root = tmp_path / "data"
    for stem in ("000", "001"):
        _write_pair(root / "cat" / "train" / "good", stem)
    gt = np.zeros((8, 10), bool)
    gt[2:4, 2:4] = True
    _write_pair(root / "cat" / "test" / "crack", "000", gt=gt)
    _write_pair(root / "cat" / "test" / "good", "000")
    write_rgb(root / "cat" / "test" / "good" / "rgb" / "001.png", np.zeros((8, 10, 3), np.uint8))
    assert list_categories(root) == ["cat"]
    assert [r.stem for r in list_records(root, "cat", "train")] == ["000", "001"]
    errors: list[DataError] = []
    test = list_records(root, "cat", "test", errors=errors)
    assert [(r.defect_type, r.label) for r in test] == [("crack", 1), ("good", 0)]
    assert len(errors) == 1 and "no matching point cloud" in str(errors[0]) and errors[0].path.name == "001.png"
    with pytest.raises(DataError, match="no matching point cloud"):
        list_records(root, "cat", "test")
    sample = load_sample(test[0])
    assert sample.gt_mask is not None and sample.gt_mask.sum() == 4 and sample.label == 1
    assert list_records(root, "cat", "validation") == []
    with pytest.raises(DataError, match="not found"):
        list_records(root, "nope", "test")


def test_folder_reader_forms(tmp_path) -> None:
    _write_pair(tmp_path / "a", "x1")
    assert [r.stem for r in list_folder_records(tmp_path / "a")] == ["x1"]
    flat = tmp_path / "flat"
    write_rgb(flat / "p.png", np.zeros((8, 10, 3), np.uint8))
    write_xyz(flat / "p.tiff", _cloud())
    write_mask(flat / "p_mask.png", np.ones((8, 10), bool))
    write_rgb(flat / "lonely.png", np.zeros((8, 10, 3), np.uint8))
    errors: list[DataError] = []
    records = list_folder_records(flat, require_both=True, errors=errors)
    assert [r.stem for r in records] == ["p"] and records[0].gt_path == flat / "p_mask.png"
    assert len(errors) == 1 and errors[0].path.name == "lonely.png"
    # By default an RGB without its cloud is a sample whose cloud is absent (scored degraded), not an error.
    lonely, paired = list_folder_records(flat, errors=errors)
    assert lonely.xyz_path == flat / "lonely.tiff" and not lonely.xyz_path.exists() and paired.stem == "p"
    assert len(errors) == 1
    assert load_sample(records[0]).label == 1
    single = list_folder_records(flat / "p.png", xyz_path=flat / "p.tiff")
    assert len(single) == 1 and single[0].label == -1
    with pytest.raises(DataError, match="no matching point cloud"):
        list_folder_records(tmp_path / "a" / "rgb")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no RGB"):
        list_folder_records(tmp_path / "empty")
