"""Confinement: names read from files never lead a write outside --out, the run folder or the cache folder."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from mmiad.cli.main import main
from mmiad.data.mvtec3d import list_records
from mmiad.data.preprocess.cache import preprocess_dataset
from mmiad.methods.modelfile import ModelFileError
from mmiad.utils.names import UnsafeNameError, plain_name

from .conftest import copy_record, tree


@pytest.mark.parametrize(
    "value", ["", ".", "..", "../x", "a/b", "a\\b", "/abs", "C:x", "C:", "x\x00y", "tab\tname", 5, None, ["a"]]
)
def test_plain_name_rejects_anything_that_is_not_one_path_component(value: object) -> None:
    with pytest.raises(UnsafeNameError) as raised:
        plain_name(value, source="run.json")
    assert str(raised.value).startswith("run.json: ")


@pytest.mark.parametrize("value", ["puck", "cookie_2", "a.b", "..a", "ü-名前", "000"])
def test_plain_name_accepts_plain_names(value: str) -> None:
    assert plain_name(value, source="x") == value


def _outside(before: dict[str, int], after: dict[str, int], allowed: tuple[str, ...]) -> list[str]:
    """Files created or changed outside the allowed top-level folders."""
    return sorted(p for p in after if before.get(p) != after[p] and not p.startswith(allowed))


@pytest.fixture
def sandbox(hostile_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``tmp_path/root`` holding a copy of the run and a default cache inside it (so any stray write shows)."""
    root = tmp_path / "root"
    shutil.copytree(hostile_run[0], root / "run")
    monkeypatch.setenv("MMIAD_CACHE", str(root / "default-cache"))
    return root


@pytest.mark.parametrize("name", ["../../escape", "../escape", "/tmp/escape", ".."])
def test_export_and_predict_refuse_a_run_index_pointing_outside(name: str, sandbox: Path, tiny_dataset: Path) -> None:
    index = json.loads((sandbox / "run" / "run.json").read_text())
    index["models"] = {name: "puck.safetensors"}
    (sandbox / "run" / "run.json").write_text(json.dumps(index))
    before = tree(sandbox.parent)
    out = sandbox / "out"
    assert main(["export", "--run", str(sandbox / "run"), "--out", str(out)]) == 1
    inputs = tiny_dataset / "puck" / "test" / "bump"
    assert main(["predict", "--run", str(sandbox / "run"), "--input", str(inputs), "--out", str(out)]) == 1
    assert tree(sandbox.parent) == before and not out.exists()


def test_resume_refuses_a_run_index_pointing_outside(sandbox: Path, tiny_dataset: Path) -> None:
    from mmiad.engine import extend_run

    (sandbox / "run" / "run.json").write_text(json.dumps({"models": {"unified": "../../stolen.safetensors"}}))
    before = tree(sandbox.parent)
    with pytest.raises(ModelFileError, match=re.escape("run.json: the name '../../stolen.safetensors'")):
        extend_run(sandbox / "run", tiny_dataset, ["dome"], epochs=1)
    assert tree(sandbox.parent) == before


@pytest.mark.parametrize("field", ["category", "split", "defect_type"])
def test_preprocessing_refuses_a_category_that_would_leave_the_cache(field: str, tiny_dataset: Path, tmp_path) -> None:
    record = copy_record(list_records(tiny_dataset, "puck", "test")[0], tmp_path / "in")
    bad = replace(record, **{field: "../../../escape"})
    before = tree(tmp_path)
    done, errors = preprocess_dataset([bad, record], "cfm", tmp_path / "cache")
    assert [r.stem for r in done] == [record.stem] and len(errors) == 1
    assert errors[0].path == record.xyz_path and "path separator" in errors[0].problem
    assert _outside(before, tree(tmp_path), ("cache/",)) == []


def test_onnx_manifest_with_a_hostile_category_is_refused(tmp_path: Path) -> None:
    from mmiad.export.manifest import Manifest

    graphs = {"scorer": {"file": "scorer.onnx"}}
    manifest = Manifest("cfm", 17, 64, 32, "weightfree", {}, graphs, None, {"hparams": {}, "category": "../x"})
    manifest.write(tmp_path)
    (tmp_path / "scorer.onnx").write_bytes(b"")
    with pytest.raises(ModelFileError, match=re.escape("manifest.json: the name '../x' contains a path separator")):
        Manifest.read(tmp_path)
    manifest.graphs = {"scorer": {"file": "../../scorer.onnx"}}
    manifest.model_config = {"hparams": {}}
    manifest.write(tmp_path)
    with pytest.raises(ModelFileError, match="contains a path separator"):
        Manifest.read(tmp_path)


def test_predict_writes_only_inside_out_and_the_cache(sandbox: Path, tiny_dataset: Path) -> None:
    """A whole predict run: every file it creates or changes lies under --out or --cache-dir."""
    inputs = sandbox / "inputs"
    for record in list_records(tiny_dataset, "puck", "test")[:3]:
        copied = copy_record(record, inputs / "rgb")
        (inputs / "xyz").mkdir(exist_ok=True)
        copied.xyz_path.rename(inputs / "xyz" / f"{copied.stem}_{record.defect_type}.tiff")
        copied.rgb_path.rename(inputs / "rgb" / f"{copied.stem}_{record.defect_type}.png")
    before = tree(sandbox.parent)
    dataset_before = tree(tiny_dataset)
    args = ["predict", "--run", str(sandbox / "run"), "--input", str(inputs), "--out", str(sandbox / "out")]
    assert main([*args, "--cache-dir", str(sandbox / "cache")]) == 0
    after = tree(sandbox.parent)
    assert _outside(before, after, ("root/out/", "root/cache/")) == []
    assert len([p for p in after if p.startswith("root/out/maps/")]) == 3
    assert tree(tiny_dataset) == dataset_before
