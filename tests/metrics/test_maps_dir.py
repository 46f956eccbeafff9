"""evaluate_maps_dir on a tiny MVTec 3D-AD layout written in the test."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mmiad.data.errors import DataError
from mmiad.data.io import read_mask, write_map, write_mask, write_rgb, write_xyz
from mmiad.data.mvtec3d import list_records
from mmiad.metrics import METRIC_KEYS, evaluate_maps_dir, map_path

H, W = 8, 10  # not square, so a transposed map is caught


def write_dataset(root: Path) -> None:
    """One category ``toy``: 3 good and 3 defective test samples (two regions in sample 002)."""
    rng = np.random.default_rng(0)
    for defect, n in (("good", 3), ("crack", 3)):
        for index in range(n):
            folder = root / "toy" / "test" / defect
            stem = f"{index:03d}"
            write_rgb(folder / "rgb" / f"{stem}.png", rng.integers(0, 255, (H, W, 3), dtype=np.uint8))
            write_xyz(folder / "xyz" / f"{stem}.tiff", rng.random((H, W, 3)).astype(np.float32) + 0.1)
            if defect != "good":
                mask = np.zeros((H, W), bool)
                mask[1 + index : 3 + index, 2:5] = True
                if index == 2:
                    mask[7, 9] = True
                write_mask(folder / "gt" / f"{stem}.png", mask)


def write_perfect_maps(root: Path, maps_dir: Path) -> None:
    for record in list_records(root, "toy", "test"):
        gt = read_mask(record.gt_path) if record.gt_path is not None else np.zeros((H, W), bool)
        write_map(map_path(maps_dir, record), gt.astype(np.float32))


@pytest.fixture
def dataset(tmp_path: Path) -> tuple[Path, Path]:
    root, maps_dir = tmp_path / "data", tmp_path / "maps"
    write_dataset(root)
    write_perfect_maps(root, maps_dir)
    return root, maps_dir


def test_perfect_maps_score_one(dataset: tuple[Path, Path]) -> None:
    root, maps_dir = dataset
    result, errors = evaluate_maps_dir(root, maps_dir, progress=True)
    assert errors == []
    assert list(result["per_category"]) == ["toy"]
    assert result["per_category"]["toy"] == pytest.approx(dict.fromkeys(METRIC_KEYS, 1.0), abs=1e-12)
    assert result["mean"] == pytest.approx(dict.fromkeys(METRIC_KEYS, 1.0), abs=1e-12)
    compat, _ = evaluate_maps_dir(root, maps_dir, aupro_mode="compat", num_thresholds=100)
    assert compat["mean"] == pytest.approx(dict.fromkeys(METRIC_KEYS, 1.0), abs=1e-12)


def test_json_score_overrides_map_max(dataset: tuple[Path, Path]) -> None:
    root, maps_dir = dataset
    (maps_dir / "toy" / "test" / "good" / "000.json").write_text(json.dumps({"score": 5.0}))
    result, errors = evaluate_maps_dir(root, maps_dir)
    assert errors == []
    toy = result["per_category"]["toy"]
    # Good 000 now outscores all 3 defective images (max 1.0): 9 pairs, 3 lost -> 6/9. Pixels are unchanged.
    assert toy["image_auroc"] == pytest.approx(6 / 9)
    assert toy["pixel_auroc"] == pytest.approx(1.0)


def test_missing_and_mismatched_maps_are_reported_and_skipped(dataset: tuple[Path, Path]) -> None:
    root, maps_dir = dataset
    missing = maps_dir / "toy" / "test" / "crack" / "001.tiff"
    missing.unlink()
    transposed = maps_dir / "toy" / "test" / "good" / "002.tiff"
    write_map(transposed, np.zeros((W, H), np.float32))
    result, errors = evaluate_maps_dir(root, maps_dir)
    assert [error.path for error in errors] == [missing, transposed]
    assert "not found" in errors[0].problem
    assert "10×8" in errors[1].problem and "8×10" in errors[1].problem
    # The 4 remaining samples (2 good, 2 defective) are still evaluated, perfectly.
    assert result["per_category"]["toy"] == pytest.approx(dict.fromkeys(METRIC_KEYS, 1.0), abs=1e-12)


def test_bad_score_file_and_only_good_maps(dataset: tuple[Path, Path]) -> None:
    root, maps_dir = dataset
    bad_json = maps_dir / "toy" / "test" / "good" / "001.json"
    bad_json.write_text('{"score": "high"}')
    for path in (maps_dir / "toy" / "test" / "crack").glob("*.tiff"):
        path.unlink()
    result, errors = evaluate_maps_dir(root, maps_dir)
    assert bad_json in [error.path for error in errors]
    # Only good samples remain: every metric is undefined, reported as null in strict JSON.
    assert result["per_category"]["toy"] == dict.fromkeys(METRIC_KEYS)
    json.dumps(result, allow_nan=False)


def test_missing_maps_dir_raises(tmp_path: Path) -> None:
    write_dataset(tmp_path / "data")
    with pytest.raises(DataError, match="anomaly map folder not found"):
        evaluate_maps_dir(tmp_path / "data", tmp_path / "nowhere")
