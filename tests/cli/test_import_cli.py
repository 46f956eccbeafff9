"""``mmiad import`` end to end: a released CFM file set becomes a run that test, predict, report and export use."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

from mmiad.cli.main import main
from mmiad.methods.modelfile import read_model_config

C2, C3 = 42, 33  # weight-free channels; the real release maps 768 ↔ 1152 (DINO + Point-MAE)
TINY = ["--extractors", "weightfree", "--set", "image_size=64", "--set", "grid_size=32"]


def write_cfm_release(root: Path, name: str) -> Path:
    """``<root>/<name>/CFM_{2Dto3D,3Dto2D}_<name>_250ep_4bs.pth``: plain FeatureProjectionMLP state dicts."""
    generator = torch.Generator().manual_seed(0)
    folder = root / name
    folder.mkdir(parents=True)
    for direction, (c_in, c_out) in {"2Dto3D": (C2, C3), "3Dto2D": (C3, C2)}.items():
        hidden = (c_in + c_out) // 2
        shapes = {"input": (hidden, c_in), "projection": (hidden, hidden), "output": (c_out, hidden)}
        state = {f"{k}.weight": torch.randn(*s, generator=generator) / s[1] ** 0.5 for k, s in shapes.items()}
        state.update({f"{k}.bias": torch.zeros(s[0]) for k, s in shapes.items()})
        torch.save(state, folder / f"CFM_{direction}_{name}_250ep_4bs.pth")
    return root


def test_import_then_predict_test_report_export(tiny_dataset: Path, tmp_path: Path, capsys) -> None:
    release = write_cfm_release(tmp_path / "release", "puck")
    cache = ["--cache-dir", str(tmp_path / "cache")]
    run = tmp_path / "run"
    assert main(["import", "--method", "cfm", "--from", str(release), "--out", str(run), *TINY, *cache]) == 0
    assert json.loads((run / "run.json").read_text()) == {
        "method": "cfm",
        "unified": False,
        "categories": ["puck"],
        "models": {"puck": "puck.safetensors"},
    }
    # Without --data there are no thresholds: scores and maps, no labels.
    folder = sorted(p for p in (tiny_dataset / "puck" / "test").iterdir() if p.name != "good")[0]
    prediction = tmp_path / "pred"
    assert main(["predict", "--run", str(run), "--input", str(folder), "--out", str(prediction), *cache]) == 0
    rows = list(csv.DictReader((prediction / "predictions.csv").open()))
    assert rows and all(row["label"] == "" and float(row["score"]) > 0 for row in rows)

    calibrated = tmp_path / "calibrated"
    args = ["import", "--method", "cfm", "--from", str(release), "--out", str(calibrated), "--data", str(tiny_dataset)]
    assert main([*args, "--no-fallback", *TINY, *cache]) == 0
    assert "thresholds" in read_model_config(calibrated / "puck.safetensors")
    metrics = tmp_path / "m.json"
    assert main(["test", "--run", str(calibrated), "--data", str(tiny_dataset), "--json", str(metrics), *cache]) == 0
    assert set(json.loads(metrics.read_text())["per_category"]) == {"puck"}
    report = tmp_path / "report"
    report_args = ["report", "--run", str(calibrated), "--data", str(tiny_dataset), "--out", str(report)]
    assert main([*report_args, "--max-samples", "2", "--clouds", "0", *cache]) == 0
    assert (report / "index.html").is_file()
    assert main(["export", "--run", str(calibrated), "--out", str(tmp_path / "onnx"), *cache]) == 0
    assert any((tmp_path / "onnx").rglob("*.onnx"))


def test_a_bad_file_is_one_error_line_and_no_run(tmp_path: Path, capsys) -> None:
    release = write_cfm_release(tmp_path / "release", "puck")
    bad = release / "puck" / "CFM_3Dto2D_puck_250ep_4bs.pth"
    state = torch.load(bad, weights_only=True)
    del state["output.bias"]
    torch.save(state, bad)
    args = ["import", "--method", "cfm", "--from", str(release), "--out", str(tmp_path / "run"), *TINY]
    assert main(args) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and str(bad) in error[0] and "missing keys (1): output.bias" in error[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release"]
