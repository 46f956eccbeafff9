"""Sensor drop-outs: a sample without a usable point cloud (or RGB) is still scored, flagged as degraded."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from mmiad.data.errors import DataError
from mmiad.data.io import write_xyz
from mmiad.data.mvtec3d import list_records
from mmiad.engine import load_trained, predict_records, run_models, train_run
from mmiad.methods.fallback import missing_modality

TINY = {"image_size": 64, "grid_size": 32, "epochs": 2, "batch_size": 2}


@pytest.fixture(scope="module")
def trained_run(tiny_dataset: Path, tmp_path_factory) -> tuple[Path, str]:
    work = tmp_path_factory.mktemp("fallback")
    cache = str(work / "cache")
    train_run("cfm", tiny_dataset, work / "run", categories=["puck"], hparams=TINY, cache_dir=cache)
    return work / "run", cache


def _copy(record, folder: Path):
    from dataclasses import replace

    folder.mkdir(parents=True, exist_ok=True)
    rgb, xyz = folder / record.rgb_path.name, folder / record.xyz_path.name
    shutil.copy(record.rgb_path, rgb)
    shutil.copy(record.xyz_path, xyz)
    return replace(record, rgb_path=rgb, xyz_path=xyz)


def test_missing_modality_detection(tiny_dataset: Path, tmp_path: Path) -> None:
    record = _copy(list_records(tiny_dataset, "puck", "test")[0], tmp_path)
    assert missing_modality(record) is None
    write_xyz(record.xyz_path, np.zeros((64, 64, 3), np.float32))
    assert missing_modality(record) == "3d"
    record.rgb_path.write_bytes(b"garbage")
    with pytest.raises(DataError, match="neither modality"):
        missing_modality(record)


def test_degraded_predictions_from_either_modality(trained_run, tiny_dataset: Path, tmp_path: Path) -> None:
    run, cache = trained_run
    trained = load_trained(run_models(run)["puck"], cache_dir=cache)
    assert trained.fallback is not None and set(trained.fallback_thresholds) == {"2d", "3d"}
    assert len(trained.fallback.banks["2d"]) > 0 and len(trained.fallback.banks["3d"]) > 0
    test = list_records(tiny_dataset, "puck", "test")
    full = _copy(test[0], tmp_path / "full")
    no_cloud = _copy(test[1], tmp_path / "no_cloud")
    write_xyz(no_cloud.xyz_path, np.zeros((64, 64, 3), np.float32))
    no_rgb = _copy(test[2], tmp_path / "no_rgb")
    no_rgb.rgb_path.unlink()
    errors: list[DataError] = []
    predictions = list(predict_records(trained, [full, no_cloud, no_rgb], errors=errors))
    assert errors == [] and [p.degraded for p in predictions] == [False, True, True]
    assert list(predictions[1].modality_maps) == ["2d_only"] and list(predictions[2].modality_maps) == ["3d_only"]
    for prediction in predictions:
        assert np.isfinite(prediction.pred_score) and prediction.pred_label in (0, 1)
        assert prediction.anomaly_map.shape == (64, 64)
    # The 3D-only map is zero where the cloud has no point (background), as the full model's.
    assert predictions[2].anomaly_map[0, 0] == pytest.approx(0.0, abs=1e-6)


def test_model_without_fallback_reports_the_sample(tiny_dataset: Path, tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    train_run("cfm", tiny_dataset, tmp_path / "run", categories=["puck"], hparams=TINY, cache_dir=cache, fallback=False)
    trained = load_trained(run_models(tmp_path / "run")["puck"], cache_dir=cache)
    assert trained.fallback is None
    record = _copy(list_records(tiny_dataset, "puck", "test")[0], tmp_path / "x")
    write_xyz(record.xyz_path, np.zeros((64, 64, 3), np.float32))
    errors: list[DataError] = []
    assert list(predict_records(trained, [record], errors=errors)) == []
    assert len(errors) == 1 and "no valid" in str(errors[0])
