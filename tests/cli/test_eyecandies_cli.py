"""Eyecandies from the command line, for every method: synth in the native layout → train → test → evaluate →
predict → report, with the format detected from the root."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from mmiad.cli.main import main
from mmiad.data.formats import open_dataset
from mmiad.methods.registry import available_methods, get_method


@pytest.fixture(scope="module")
def eyecandies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("eyecandies_cli") / "data"
    synth = ["synth", "--out", str(root), "--preset", "tiny", "--categories", "puck", "--format", "eyecandies"]
    assert main(synth) == 0
    return root


def _settings(hparams: dict) -> list[str]:
    """The method's tiny settings as ``--set KEY=VALUE`` options."""
    return [arg for key, value in hparams.items() for arg in ("--set", f"{key}={json.dumps(value)}")]


@pytest.mark.slow
@pytest.mark.parametrize("method", [m for m in available_methods() if get_method(m).needs_training])
def test_every_method_runs_on_eyecandies(method: str, eyecandies: Path, tmp_path: Path, tiny_hparams: dict) -> None:
    run, cache = tmp_path / "run", str(tmp_path / "cache")
    train = ["train", "--method", method, "--data", str(eyecandies), "--out", str(run), "--cache-dir", cache]
    assert main([*train, *_settings(tiny_hparams[method])]) == 0
    info = json.loads((run / "run.json").read_text())
    assert info["models"] == {"puck": "puck.safetensors"}

    metrics, maps = tmp_path / "m.json", tmp_path / "maps"
    assert main(["test", "--run", str(run), "--data", str(eyecandies), "--json", str(metrics), "--maps", str(maps),
                 "--cache-dir", cache]) == 0  # fmt: skip
    result = json.loads(metrics.read_text())["per_category"]["puck"]
    assert 0.0 <= result["image_auroc"] <= 1.0 and 0.0 <= result["pixel_auroc"] <= 1.0
    test_records = open_dataset(eyecandies).records("puck", "test")
    written = sorted(maps.rglob("*.tiff"))
    assert len(written) == len(test_records)  # test_public, every sample scored
    assert {p.parent.name for p in written} == {"good", "bad"}

    evaluated = tmp_path / "e.json"
    assert main(["evaluate", "--data", str(eyecandies), "--maps", str(maps), "--json", str(evaluated)]) == 0
    again = json.loads(evaluated.read_text())["per_category"]["puck"]
    assert again["image_auroc"] == pytest.approx(result["image_auroc"], abs=1e-9)  # same scores via the JSON files

    out = tmp_path / "pred"
    assert main(["predict", "--run", str(run), "--input", str(eyecandies), "--category", "puck", "--out", str(out),
                 "--cache-dir", cache]) == 0  # fmt: skip
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert [r["name"] for r in rows] == [r.stem for r in test_records]
    assert {r["model"] for r in rows} == {"puck"} and {r["modality"] for r in rows} == {"2d+3d"}

    page = tmp_path / "report"
    assert main(["report", "--run", str(run), "--data", str(eyecandies), "--out", str(page), "--cache-dir", cache]) == 0
    assert (page / "index.html").is_file()
