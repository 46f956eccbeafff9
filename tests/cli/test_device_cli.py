"""``--device`` / ``--precision`` on the command line: recorded in the run, never required to load it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmiad.cli.main import main
from mmiad.engine.trained import load_trained
from mmiad.methods.modelfile import load_model_file, save_model_file

TINY = ["--epochs", "1", "--image-size", "64", "--grid-size", "32"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory, tiny_dataset: Path) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("device-run")
    run, cache = root / "run", str(root / "cache")
    args = ["train", "--method", "cfm", "--data", str(tiny_dataset), "--out", str(run), "--categories", "puck"]
    assert main([*args, *TINY, "--cache-dir", cache, "--device", "cpu", "--precision", "fp32"]) == 0
    return run, cache


def test_the_run_records_where_it_was_trained(trained_run: tuple[Path, str]) -> None:
    run, _ = trained_run
    index = json.loads((run / "run.json").read_text())
    assert index["trained_on"] == "cpu" and index["precision"] == "fp32"
    _, config = load_model_file(run / "puck.safetensors")
    assert config["trained_on"] == "cpu" and config["hparams"]["device"] == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_model_trained_on_a_missing_gpu_predicts_here_as_it_scores_on_the_cpu(
    trained_run: tuple[Path, str], tiny_dataset: Path, tmp_path: Path
) -> None:
    run, cache = trained_run
    tensors, config = load_model_file(run / "puck.safetensors")
    config["hparams"]["device"] = "cuda:3"  # as written by a training on the fourth GPU of another machine
    moved = tmp_path / "gpu-run"
    moved.mkdir()
    save_model_file(moved / "puck.safetensors", tensors, config)
    (moved / "run.json").write_text((run / "run.json").read_text())

    loaded = load_trained(moved / "puck.safetensors", cache_dir=cache)
    assert loaded.model.config.device == "auto"
    reference = load_trained(run / "puck.safetensors", cache_dir=cache)
    sample = _first_test_record(tiny_dataset)
    ours, theirs = next(iter(loaded.model.predict([sample]))), next(iter(reference.model.predict([sample])))
    assert ours.pred_score == theirs.pred_score
    assert torch.equal(torch.as_tensor(ours.anomaly_map), torch.as_tensor(theirs.anomaly_map))

    out = tmp_path / "pred"
    assert (
        main(
            [
                "predict",
                "--run",
                str(moved),
                "--input",
                str(tiny_dataset),
                "--category",
                "puck",
                "--out",
                str(out),
                "--cache-dir",
                cache,
            ]
        )
        == 0
    )
    assert (out / "predictions.csv").is_file()


def _first_test_record(root: Path):
    from mmiad.data.formats import open_dataset

    return open_dataset(root).records("puck", "test")[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_a_missing_gpu_is_one_line_and_exit_1(tiny_dataset: Path, tmp_path: Path, capsys) -> None:
    args = ["train", "--method", "cfm", "--data", str(tiny_dataset), "--out", str(tmp_path / "r"), *TINY]
    assert main([*args, "--device", "cuda"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA device; use --device cpu" in err[0]


def test_bad_device_and_precision_are_usage_errors(tiny_dataset: Path, tmp_path: Path, capsys) -> None:
    args = ["train", "--data", str(tiny_dataset), "--out", str(tmp_path / "r")]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--device", "gpu"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--precision", "fp8"])
    assert exit_info.value.code == 2


def test_a_trained_run_keeps_its_precision(trained_run: tuple[Path, str], tiny_dataset: Path, capsys) -> None:
    run, _ = trained_run
    assert main(["test", "--run", str(run), "--data", str(tiny_dataset), "--precision", "bf16"]) == 1
    assert "uses the precision it was trained with" in capsys.readouterr().err
