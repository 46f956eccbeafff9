"""``mmiad train --method rad --shots 1`` then ``mmiad test`` on the tiny synthetic preset."""

from __future__ import annotations

import json
from pathlib import Path

from mmiad.cli.main import main


def test_rad_one_shot_unified_train_and_test(tmp_path: Path, capsys) -> None:
    data, run, cache = tmp_path / "data", tmp_path / "run", str(tmp_path / "cache")
    assert main(["synth", "--out", str(data), "--preset", "tiny", "--seed", "2"]) == 0
    train = ["train", "--method", "rad", "--data", str(data), "--out", str(run), "--unified", "--shots", "1"]
    options = ["--image-size", "64", "--set", "k_image=4", "--set", "map_size=64", "--cache-dir", cache]
    assert main([*train, "--seed", "3", *options]) == 0
    index = json.loads((run / "run.json").read_text())
    assert index["method"] == "rad" and index["models"] == {"unified": "unified.safetensors"}
    categories = sorted(p.name for p in data.iterdir())
    assert sorted(index["few_shot"]) == categories
    for category, draw in index["few_shot"].items():
        assert draw["shots"] == 1 and draw["seed"] == 3 and draw["selection"] == "random"
        assert len(draw["files"]) == 1 and draw["files"][0].startswith(f"{category}/train/")
    test = ["test", "--run", str(run), "--data", str(data), "--json", str(tmp_path / "m.json"), "--cache-dir", cache]
    assert main(test) == 0
    result = json.loads((tmp_path / "m.json").read_text())
    assert sorted(result["per_category"]) == categories
    assert 0.0 <= result["mean"]["image_auroc"] <= 1.0


def test_shot_selection_without_shots_is_a_user_error(tmp_path: Path, capsys) -> None:
    args = ["train", "--method", "rad", "--data", str(tmp_path), "--out", str(tmp_path / "r")]
    args += ["--shot-selection", "first"]
    assert main(args) == 1
    assert "--shots" in capsys.readouterr().err
