"""``mmiad test --method rad --data D``: training-free, so no train step, and the same metrics as train + test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmiad.cli.main import main
from mmiad.methods.rad import RAD

TINY = [f"--set={key}={value}" for key, value in RAD.tiny_hparams.items()]


@pytest.mark.slow
def test_test_method_rad_equals_train_then_test(tiny_dataset: Path, tmp_path: Path) -> None:
    cache = ["--cache-dir", str(tmp_path / "cache")]
    one_step = tmp_path / "one.json"
    assert main(["test", "--method", "rad", "--data", str(tiny_dataset), *TINY, *cache, "--json", str(one_step)]) == 0
    run, two_steps = tmp_path / "run", tmp_path / "two.json"
    assert (
        main(["train", "--method", "rad", "--unified", "--data", str(tiny_dataset), "--out", str(run), *TINY, *cache])
        == 0
    )
    assert main(["test", "--run", str(run), "--data", str(tiny_dataset), *cache, "--json", str(two_steps)]) == 0
    first, second = json.loads(one_step.read_text()), json.loads(two_steps.read_text())
    assert set(first["per_category"]) == {"block", "puck"}
    for category, metrics in second["per_category"].items():
        for name, value in metrics.items():
            assert first["per_category"][category][name] == pytest.approx(value, abs=1e-9), (category, name)
    assert not list(tmp_path.glob("mmiad-rad-*"))  # the temporary run is not left behind in the working folder


def test_a_method_that_trains_is_refused_with_the_commands(tiny_dataset: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["test", "--method", "cfm", "--data", str(tiny_dataset)]) == 1  # refused before any work
    assert "mmiad train --method cfm" in capsys.readouterr().err
