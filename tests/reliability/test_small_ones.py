"""predictions.csv names the user's files; fallback calibration failures are reported; degraded rows say why."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from mmiad.cli.main import main
from mmiad.data.errors import DataError
from mmiad.data.io import write_xyz
from mmiad.data.mvtec3d import list_records
from mmiad.engine import load_trained, predict_records, run_models
from mmiad.engine.trained import fit_fallback

from .conftest import copy_record


def _inputs(tiny_dataset: Path, folder: Path, count: int) -> list:
    return [copy_record(r, folder / f"s{i}") for i, r in enumerate(list_records(tiny_dataset, "puck", "test")[:count])]


def test_predictions_csv_names_the_users_xyz_and_the_cache_copy_apart(hostile_run, tiny_dataset, tmp_path) -> None:
    run, _ = hostile_run
    record = _inputs(tiny_dataset, tmp_path / "in", 1)[0]
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = ["predict", "--run", str(run), "--input", str(record.rgb_path), "--xyz", str(record.xyz_path)]
    assert main([*args, "--out", str(out), "--cache-dir", str(cache)]) == 0
    (row,) = list(csv.DictReader((out / "predictions.csv").open()))
    assert row["xyz_path"] == str(record.xyz_path) and row["rgb_path"] == str(record.rgb_path)
    assert Path(row["xyz_cache_path"]).is_relative_to(cache) and Path(row["xyz_cache_path"]).is_file()
    assert row["label"] in ("0", "1") and row["note"] == ""


def test_a_degraded_sample_gets_a_label_or_a_stated_reason(hostile_run, tiny_dataset, tmp_path) -> None:
    run, cache = hostile_run
    trained = load_trained(run_models(run)["puck"], cache_dir=str(cache))
    no_cloud = _inputs(tiny_dataset, tmp_path, 1)[0]
    write_xyz(no_cloud.xyz_path, np.zeros((64, 64, 3), np.float32))
    (labelled,) = predict_records(trained, [no_cloud])
    assert labelled.degraded and labelled.pred_label in (0, 1)
    reason = f"{no_cloud.xyz_path}: the point cloud has no valid (non-zero, finite) point"
    assert labelled.note == f"degraded: scored from 2d only ({reason})"  # the file and the reason
    trained.fallback_thresholds.pop("2d")
    (unlabelled,) = predict_records(trained, [no_cloud])
    assert unlabelled.pred_label is None
    assert unlabelled.note.endswith("; not labelled: the model has no 2d-only threshold")
    assert unlabelled.record == no_cloud  # the user's record, not the cache copy


def test_fallback_calibration_failures_are_reported(hostile_run, tiny_dataset, tmp_path) -> None:
    run, cache = hostile_run
    trained = load_trained(run_models(run)["puck"], cache_dir=str(cache))
    train = list_records(tiny_dataset, "puck", "train")
    calibration = _inputs(tiny_dataset, tmp_path, 2)
    for record in calibration:
        record.rgb_path.write_bytes(b"not a png")
    trained.fallback_thresholds = {}
    errors: list[DataError] = []
    fit_fallback(trained, train, calibration, max_fpr=0.01, source="validation", errors=errors)
    messages = [str(e) for e in errors]
    assert set(trained.fallback_thresholds) == {"3d"}  # the clouds are fine, the images are not
    for record in calibration:
        assert any(m.startswith(f"{record.rgb_path}: 2d-only fallback calibration: unreadable") for m in messages)
    assert "the 2d-only fallback has no threshold: no calibration sample scored" in messages
    assert len(messages) == len(set(messages)) == 3
