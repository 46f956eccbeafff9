"""``mmiad test/predict --method musc`` end to end on the tiny synthetic data (no training step)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mmiad.cli.main import main
from mmiad.engine.zero_shot import robust_threshold

SMALL = ["--set", "image_size=64", "--set", "num_group=32", "--set", "group_size=16"]


def test_robust_threshold_is_median_plus_k_scaled_mad() -> None:
    values = [1.0, 2.0, 3.0, 4.0, 100.0]  # median 3, absolute deviations 2,1,0,1,97 → MAD 1
    assert robust_threshold(values, k=3.0) == pytest.approx(3.0 + 3.0 * 1.4826)
    assert robust_threshold([5.0] * 4, k=3.0) == 5.0


def test_train_refuses_musc_with_a_pointer(tiny_dataset: Path, tmp_path: Path, capsys) -> None:
    assert main(["train", "--method", "musc", "--data", str(tiny_dataset), "--out", str(tmp_path / "run")]) == 1
    assert "needs no training" in capsys.readouterr().err
    assert main(["test", "--data", str(tiny_dataset)]) == 1
    assert "--run RUN is required" in capsys.readouterr().err


def test_test_and_predict_zero_shot(tiny_dataset: Path, tmp_path: Path, capsys) -> None:
    cache = str(tmp_path / "cache")
    metrics = tmp_path / "m.json"
    args = ["test", "--method", "musc", "--data", str(tiny_dataset), "--json", str(metrics), "--cache-dir", cache]
    assert main([*args, "--categories", "puck", *SMALL]) == 0
    result = json.loads(metrics.read_text())
    assert set(result["per_category"]) == {"puck"}
    assert 0.0 <= result["mean"]["image_auroc"] <= 1.0

    batch = tmp_path / "batch"
    batch.mkdir()
    for rgb in sorted((tiny_dataset / "puck" / "test").glob("*/rgb/*.png")):
        name = f"{rgb.parent.parent.name}_{rgb.stem}"
        shutil.copy(rgb, batch / f"{name}.png")
        shutil.copy(rgb.parent.parent / "xyz" / f"{rgb.stem}.tiff", batch / f"{name}.tiff")
    out = tmp_path / "pred"
    predict = ["predict", "--method", "musc", "--input", str(batch), "--out", str(out), "--cache-dir", cache]
    assert main([*predict, "--outlier-k", "0.5", *SMALL]) == 0
    with (out / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(list(batch.glob("*.png")))
    scores = np.array([float(r["score"]) for r in rows])
    median = np.median(scores)
    threshold = median + 0.5 * 1.4826 * np.median(np.abs(scores - median))
    assert [int(r["label"]) for r in rows] == [int(s > threshold) for s in scores]
    for row in rows:
        assert (out / "maps" / f"{row['name']}.tiff").is_file()
        assert (out / "overlays" / f"{row['name']}.png").is_file()
        assert (out / "masks" / f"{row['name']}.png").is_file()
    assert main([*predict, "--threshold", "-1", *SMALL]) == 0  # --threshold overrides the rule
    with (out / "predictions.csv").open() as handle:
        assert all(int(r["label"]) == 1 for r in csv.DictReader(handle))
    few = tmp_path / "few"
    few.mkdir()
    for path in sorted(batch.iterdir())[:8]:  # 4 samples
        shutil.copy(path, few / path.name)
    assert main(["predict", "--method", "musc", "--input", str(few), "--out", str(tmp_path / "p2"), *SMALL]) == 1
    assert "at least 5 samples" in capsys.readouterr().err
