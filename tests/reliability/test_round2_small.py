"""The smaller defects of the second round: a diverging training, an empty ``checkpoint_dir``, and a MuSc batch
that bad files shrink below its minimum. Each is one line naming what is wrong, exit 1, nothing written elsewhere."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from mmiad.cli.main import main
from mmiad.data.mvtec3d import list_records

from .conftest import copy_record, tree


def test_a_diverging_training_is_one_line_exit_1(tiny_dataset: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    """FloatingPointError is how every method reports a non-finite loss; it is the settings' or data's doing."""
    import mmiad.engine

    def diverge(*args, **kwargs):
        raise FloatingPointError("CFM training diverged (non-finite loss); try a lower learning rate")

    monkeypatch.setattr(mmiad.engine, "train_run", diverge)
    args = ["train", "--method", "cfm", "--data", str(tiny_dataset), "--out", str(tmp_path / "run")]
    assert main(args) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["mmiad train: error: CFM training diverged (non-finite loss); try a lower learning rate"]


def test_an_empty_checkpoint_dir_writes_nothing_into_the_working_directory(
    tiny_dataset: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["train", "--method", "unircm", "--data", str(tiny_dataset), "--out", str(tmp_path / "run")]
    assert main([*args, "--set", "checkpoint_dir=", "--cache-dir", str(tmp_path / "cache")]) in (1, 2)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "checkpoint_dir" in lines[0]
    assert tree(tmp_path) == {}


def test_a_musc_batch_shrunk_by_bad_files_names_them(tiny_dataset: Path, tmp_path: Path, capsys) -> None:
    """Five samples is MuSc's minimum (interval 0.3); two unreadable ones leave three, and the error names both."""
    folder = tmp_path / "in"
    folder.mkdir()
    for i, record in enumerate(list_records(tiny_dataset, "puck", "test")[:5]):
        copied = copy_record(record, tmp_path / "tmp")
        copied.rgb_path.rename(folder / f"p{i}.png")
        copied.xyz_path.rename(folder / f"p{i}.tiff")
    shutil.rmtree(tmp_path / "tmp")
    (folder / "p1.png").write_bytes(b"not a png")
    (folder / "p3.tiff").write_bytes(b"not a tiff")
    small = {"image_size": 64, "num_group": 48, "group_size": 16}  # as tests/methods/test_musc_model.py
    settings = [arg for k, v in small.items() for arg in ("--set", f"{k}={json.dumps(v)}")]
    args = ["predict", "--method", "musc", "--input", str(folder), "--out", str(tmp_path / "out")]
    assert main([*args, *settings, "--cache-dir", str(tmp_path / "cache")]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    error = [line for line in lines if "error" in line]
    assert len(error) == 1 and "only 3 of 5 samples could be read" in error[0]
    assert str(folder / "p1.png") in error[0] and str(folder / "p3.tiff") in error[0]
