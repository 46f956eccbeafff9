"""CMDR-IAD through the engine's shared loop: the missing-modality fallback and failing closed."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from mmiad.data.errors import DataError
from mmiad.data.io import write_xyz
from mmiad.data.mvtec3d import list_records
from mmiad.engine import load_trained, predict_records, run_models, train_run
from mmiad.methods.cmdr import CMDR


def _copy(record, folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    rgb, xyz = folder / record.rgb_path.name, folder / record.xyz_path.name
    shutil.copy(record.rgb_path, rgb)
    shutil.copy(record.xyz_path, xyz)
    return replace(record, rgb_path=rgb, xyz_path=xyz)


def test_fallback_for_a_missing_cloud_and_a_non_finite_score_fails_closed(tiny_dataset: Path, tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    train_run("cmdr", tiny_dataset, tmp_path / "run", categories=["puck"], hparams=CMDR.tiny_hparams, cache_dir=cache)
    trained = load_trained(run_models(tmp_path / "run")["puck"], cache_dir=cache)
    test = list_records(tiny_dataset, "puck", "test")
    full = _copy(test[0], tmp_path / "full")
    no_cloud = _copy(test[1], tmp_path / "no_cloud")
    write_xyz(no_cloud.xyz_path, np.zeros((64, 64, 3), np.float32))
    errors: list[DataError] = []
    predictions = list(predict_records(trained, [full, no_cloud], errors=errors))
    assert errors == [] and [p.degraded for p in predictions] == [False, True]
    assert all(np.isfinite(p.pred_score) and p.pred_label in (0, 1) for p in predictions)
    # A network gone non-finite gives a NaN score: the sample is reported, never labelled "good".
    with torch.no_grad():
        trained.model.networks_["Dec3D"].projection[0].weight.fill_(float("nan"))
    errors = []
    assert list(predict_records(trained, [full], errors=errors)) == []
    assert len(errors) == 1 and "anomaly score nan" in str(errors[0])
