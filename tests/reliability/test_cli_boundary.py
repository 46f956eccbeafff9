"""The command line's error boundary: one line per failure, documented exit statuses, tracebacks only on request."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from mmiad.cli import common
from mmiad.cli.main import main
from mmiad.data.mvtec3d import list_records

from .conftest import copy_record
from .test_readers import png_declaring


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "error" in line]


def _inputs(tiny_dataset: Path, folder: Path, count: int) -> Path:
    """A flat folder of ``count`` NAME.png + NAME.tiff pairs."""
    folder.mkdir(parents=True)
    for i, record in enumerate(list_records(tiny_dataset, "puck", "test")[:count]):
        copied = copy_record(record, folder / "tmp")
        copied.rgb_path.rename(folder / f"p{i}.png")
        copied.xyz_path.rename(folder / f"p{i}.tiff")
    shutil.rmtree(folder / "tmp")
    return folder


def test_predict_exit_statuses_full_partial_none(hostile_run, tiny_dataset: Path, tmp_path: Path, capsys) -> None:
    run, cache = hostile_run
    inputs = _inputs(tiny_dataset, tmp_path / "in", 3)
    base = ["predict", "--run", str(run), "--input", str(inputs), "--cache-dir", str(cache)]
    assert main([*base, "--out", str(tmp_path / "all")]) == common.EXIT_OK
    (inputs / "p1.png").write_bytes(png_declaring(30000, 30000))
    (inputs / "p1.tiff").write_bytes(b"II*\x00garbage")  # neither modality usable: not even the fallback helps
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "some")]) == common.EXIT_PARTIAL
    rows = list(csv.DictReader((tmp_path / "some" / "predictions.csv").open()))
    assert sorted(r["name"] for r in rows) == ["p0", "p2"]  # every good sample is still written
    assert sorted(p.name for p in (tmp_path / "some" / "maps").iterdir()) == ["p0.tiff", "p2.tiff"]
    assert str(inputs / "p1.png") in capsys.readouterr().err
    for name in ("p0", "p2"):
        (inputs / f"{name}.tiff").write_bytes(b"")
        (inputs / f"{name}.png").write_bytes(b"")
    assert main([*base, "--out", str(tmp_path / "none")]) == common.EXIT_ERROR


@pytest.mark.parametrize(
    ("index", "needle"),
    [('{"models": ', "run.json: not valid JSON"), ({"method": "cfm"}, "run.json: field 'models' is missing")],
)
def test_every_command_reading_a_run_reports_one_line(index, needle, hostile_run, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(hostile_run[0], run)
    (run / "run.json").write_text(index if isinstance(index, str) else json.dumps(index))
    commands = [
        ["test", "--run", str(run), "--data", str(tmp_path)],
        ["predict", "--run", str(run), "--input", str(tmp_path), "--out", str(tmp_path / "o")],
        ["export", "--run", str(run), "--out", str(tmp_path / "e")],
        ["report", "--run", str(run), "--data", str(tmp_path), "--out", str(tmp_path / "r")],
    ]
    for command in commands:
        capsys.readouterr()
        assert main(command) == common.EXIT_ERROR
        err = capsys.readouterr().err
        assert "Traceback" not in err
        (line,) = _error_lines(err)
        assert line.startswith(f"mmiad {command[0]}: error: ") and needle in line


def test_a_bug_is_one_line_with_exit_4_and_a_traceback_only_on_request(monkeypatch, tmp_path: Path, capsys) -> None:
    import mmiad.engine

    def broken(*_args, **_kwargs):
        raise KeyError("boom")

    monkeypatch.setattr(mmiad.engine, "RunModels", broken)
    command = ["predict", "--run", str(tmp_path), "--input", str(tmp_path), "--out", str(tmp_path / "o")]
    assert main(command) == common.EXIT_INTERNAL
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("mmiad predict: internal error: KeyError: 'boom'") and "--debug" in line
    with pytest.raises(KeyError):
        main(["--debug", *command])
    with pytest.raises(KeyError):
        main([*command, "--debug"])
    monkeypatch.setenv("MMIAD_DEBUG", "1")
    with pytest.raises(KeyError):
        main(command)


def test_a_multi_line_message_becomes_one_line(hostile_run, tiny_dataset: Path, tmp_path: Path, capsys) -> None:
    run, cache = hostile_run
    command = ["predict", "--run", str(run), "--input", str(tmp_path), "--out", str(tmp_path / "o")]
    # Another extractor preset than at training: the library's message spans lines ("trained with" / "now").
    assert main([*command, "--cache-dir", str(cache)]) == common.EXIT_ERROR  # empty input folder
    capsys.readouterr()
    monkey_run = tmp_path / "run"
    shutil.copytree(run, monkey_run)
    from mmiad.methods.modelfile import load_model_file, save_model_file

    tensors, config = load_model_file(monkey_run / "puck.safetensors")
    config["pipeline"] = {"edited": True}
    save_model_file(monkey_run / "puck.safetensors", tensors, config)
    inputs = _inputs(tiny_dataset, tmp_path / "in", 1)
    assert main(["predict", "--run", str(monkey_run), "--input", str(inputs), "--out", str(tmp_path / "o")]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "trained with other extractors" in line and "puck.safetensors" in line
