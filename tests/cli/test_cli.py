"""End-to-end runs of the command line on the tiny synthetic preset."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from mmiad.cli.main import build_parser, main
from mmiad.data.io import read_map

KEYS = {"image_auroc", "pixel_auroc", "aupro@0.3", "aupro@0.1", "aupro@0.05", "aupro@0.01"}


def test_help_lists_the_subcommands(capsys) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    for command in ("synth", "preprocess", "train", "test", "evaluate", "predict", "cache", "demo", "export", "report"):
        assert command in text


def test_synth_train_test_evaluate_predict(tmp_path: Path, capsys) -> None:
    data, run, cache = tmp_path / "data", tmp_path / "run", str(tmp_path / "cache")
    assert main(["synth", "--out", str(data), "--preset", "tiny", "--seed", "1"]) == 0
    categories = sorted(p.name for p in data.iterdir())
    assert len(categories) >= 2
    train_args = ["train", "--method", "cfm", "--data", str(data), "--out", str(run), "--epochs", "3"]
    assert main([*train_args, "--image-size", "64", "--grid-size", "32", "--cache-dir", cache]) == 0
    assert json.loads((run / "run.json").read_text())["models"].keys() == set(categories)

    maps = tmp_path / "maps"
    test_args = ["test", "--run", str(run), "--data", str(data), "--json", str(tmp_path / "m.json")]
    assert main([*test_args, "--maps", str(maps), "--cache-dir", cache]) == 0
    result = json.loads((tmp_path / "m.json").read_text())
    assert set(result["per_category"]) == set(categories) and set(result["mean"]) == KEYS
    table = capsys.readouterr().out
    assert "mean" in table and categories[0] in table

    # The written maps are at the ground truth's resolution and `evaluate` reproduces the image AUROC from them
    # (the JSON score files carry the model's image score).
    written = sorted(maps.rglob("*.tiff"))
    assert written and read_map(written[0]).shape == (64, 64)
    assert main(["evaluate", "--data", str(data), "--maps", str(maps), "--json", str(tmp_path / "e.json")]) == 0
    evaluated = json.loads((tmp_path / "e.json").read_text())
    for category in categories:
        ours, theirs = result["per_category"][category], evaluated["per_category"][category]
        assert theirs["image_auroc"] == pytest.approx(ours["image_auroc"], abs=1e-9)

    markdown = tmp_path / "compare.md"
    compare_args = ["compare", "--data", str(data), "--runs", str(run), "--markdown", str(markdown)]
    assert main([*compare_args, "--cache-dir", cache]) == 0
    table = markdown.read_text()
    assert "I-AUROC" in table and f"{result['mean']['image_auroc']:.3f}" in table

    defect = next(p for p in (data / categories[0] / "test").iterdir() if p.name != "good")
    out = tmp_path / "pred"
    predict_args = ["predict", "--run", str(run), "--input", str(defect), "--out", str(out)]
    assert main([*predict_args, "--category", categories[0], "--cache-dir", cache]) == 0
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == len(list((defect / "rgb").iterdir()))
    assert all(row["label"] in ("0", "1") and float(row["score"]) >= 0 for row in rows)
    stem = rows[0]["name"]
    assert (out / "overlays" / f"{stem}.png").is_file() and (out / "masks" / f"{stem}.png").is_file()
    assert np.isfinite(read_map(out / "maps" / f"{stem}.tiff")).all()

    # The same prediction through the exported ONNX graphs gives the same scores.
    pytest.importorskip("onnxruntime")
    exported, onnx_out = tmp_path / "export", tmp_path / "pred_onnx"
    assert main(["export", "--run", str(run), "--out", str(exported), "--category", categories[0]]) == 0
    onnx_args = ["predict", "--onnx", str(exported), "--input", str(defect), "--out", str(onnx_out)]
    assert main([*onnx_args, "--category", categories[0], "--cache-dir", cache]) == 0
    onnx_rows = list(csv.DictReader((onnx_out / "predictions.csv").open()))
    assert [r["name"] for r in onnx_rows] == [r["name"] for r in rows]
    for torch_row, onnx_row in zip(rows, onnx_rows, strict=True):
        assert float(onnx_row["score"]) == pytest.approx(float(torch_row["score"]), rel=1e-4, abs=1e-6)
        assert onnx_row["label"] == torch_row["label"]


def test_user_errors_exit_1_with_a_message(tmp_path: Path, capsys) -> None:
    assert main(["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "run")]) == 1
    assert "dataset root not found" in capsys.readouterr().err
    assert main(["test", "--run", str(tmp_path), "--data", str(tmp_path)]) == 1
    assert "not a run folder" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--extractors", "nope"]) == 1


def test_bad_files_are_reported_and_the_rest_carry_on(tmp_path: Path, capsys) -> None:
    data, cache = tmp_path / "data", str(tmp_path / "cache")
    assert main(["synth", "--out", str(data), "--preset", "tiny", "--categories", "puck"]) == 0
    broken = data / "puck" / "train" / "good" / "xyz" / "001.tiff"
    broken.write_bytes(broken.read_bytes()[:64])
    (data / "puck" / "test" / "stain" / "xyz" / "000.tiff").unlink()
    train_args = ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--epochs", "1"]
    assert main([*train_args, "--image-size", "64", "--grid-size", "32", "--cache-dir", cache]) == 0
    err = capsys.readouterr().err
    assert "1 file(s) skipped" in err and "001.tiff" in err and "truncated" in err
    test_args = ["test", "--run", str(tmp_path / "run"), "--data", str(data), "--json", str(tmp_path / "m.json")]
    assert main([*test_args, "--cache-dir", cache]) == 0
    err = capsys.readouterr().err
    assert "no matching point cloud" in err and "stain" in err
    assert json.loads((tmp_path / "m.json").read_text())["per_category"]["puck"]["image_auroc"] is not None


def test_set_passes_typed_hyperparameters(tmp_path: Path, capsys) -> None:
    from mmiad.cli.train_command import _hparams

    sets = ["--set", "use_orq=false", "--set", "branches=rfi"]
    args = build_parser().parse_args(
        ["train", "--method", "unircm", "--data", "d", "--out", "o", "--epochs", "3", *sets]
    )
    assert _hparams(args) == {"epochs": 3, "use_orq": False, "branches": "rfi"}
    bad = build_parser().parse_args(["train", "--data", "d", "--out", "o", "--set", "novalue"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        _hparams(bad)


def test_test_compat_rescores_officially_and_leaves_the_aupro_to_the_run(monkeypatch, tmp_path: Path) -> None:
    import mmiad.engine
    from mmiad.metrics import summarize

    calls: list[dict] = []

    def fake_evaluate_run(run: object, data: object, **kwargs: object) -> tuple[dict, list]:
        calls.append(kwargs)
        return summarize({}), []

    monkeypatch.setattr(mmiad.engine, "evaluate_run", fake_evaluate_run)
    base = ["test", "--run", str(tmp_path), "--data", str(tmp_path)]
    assert main([*base, "--compat"]) == 0
    assert main(base) == 0
    assert main([*base, "--aupro", "compat", "--num-thresholds", "50"]) == 0
    # None lets each model's protocol decide (the papers' sampled AUPRO with the method's count under compat).
    assert [(c["overrides"], c["aupro_mode"], c["num_thresholds"]) for c in calls] == [
        ({"compat": True}, None, None),
        (None, None, None),
        (None, "compat", 50),
    ]
