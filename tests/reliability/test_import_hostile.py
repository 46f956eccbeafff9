"""Hostile released files given to ``mmiad import``: NaN and infinite weights, stride-0 and zip bombs, overlapping
storage, wrong dimensions, empty ORQ codebooks, text and HTML posing as checkpoints.

Each is refused with exit status 1 and one line naming the file (and the tensor), before any module is sized
from it; nothing is left beside ``--out``; a bomb is refused with bounded memory (measured in a subprocess).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mmiad
from mmiad.cli.main import main
from mmiad.features.checkpoints import CheckpointError, read_checkpoint
from mmiad.methods.cfm.official import import_cfm_pair
from mmiad.methods.m3dm.official import load_official_uff
from mmiad.methods.unircm.official import load_official_orq

from .conftest import tree
from .released import C2, C3, HTML, LFS, TEXT, TINY_IMPORT, cfm_state, deflated, orq_file, stride0, uff_state
from .released import write_cfm_release as write_release


def _import(tmp_path: Path, *extra: str) -> list[str]:
    return ["import", "--method", "cfm", "--from", str(tmp_path / "release"), "--out", str(tmp_path / "run"),
            *TINY_IMPORT, *extra]  # fmt: skip


def _refused(tmp_path: Path, capsys, bad: Path, *needles: str, extra: tuple[str, ...] = ()) -> str:
    """Run the import and check the common guarantees: exit 1, one line naming ``bad``, nothing written."""
    before = tree(tmp_path)
    assert main(_import(tmp_path, *extra)) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0], lines
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert tree(tmp_path) == before  # no run, no hidden .run.import-XXXX folder, nothing else
    return lines[0]


def _save(path: Path, state: dict) -> Path:
    torch.save(state, path)
    return path


@pytest.mark.parametrize(
    ("damage", "needles"),
    [
        ("nan", ("'projection.weight'", "NaN or infinite")),
        ("inf", ("'output.bias'", "NaN or infinite")),
        ("stride0", ("'input.weight'", "stride-0")),
        ("overlap", ("overlap in the same storage",)),
        ("one_dim", ("'input.weight'", "expected 2 non-empty dimensions")),
        ("three_dim", ("'output.weight'", "expected 2 non-empty dimensions")),
        ("shape", ("shape mismatches (1): projection.weight",)),
        ("deflated", ("compressed entries", "zip bomb")),
        ("legacy", ("legacy (pre-1.6)",)),
        ("html", ("an HTML page",)),
        ("text", ("a text file",)),
        ("lfs", ("Git LFS pointer",)),
        ("empty", ("an empty file",)),
        ("int_key", ("key 7 is not a name",)),
        ("list", ("expected a dict of tensors",)),
    ],
)
def test_a_hostile_cfm_file_is_one_line_exit_1_and_nothing_written(tmp_path: Path, capsys, damage, needles) -> None:
    bad = write_release(tmp_path / "release")["2Dto3D"]
    state = cfm_state(C2, C3)
    hidden = (C2 + C3) // 2
    if damage == "nan":
        state["projection.weight"][3, 4] = float("nan")
    elif damage == "inf":
        state["output.bias"][0] = float("-inf")
    elif damage == "stride0":
        state["input.weight"] = stride0((hidden, C2))
    elif damage == "overlap":
        state["projection.bias"] = state["projection.weight"].view(-1)[:hidden]  # a view into another tensor
    elif damage == "one_dim":
        state["input.weight"] = torch.ones(C2)
    elif damage == "three_dim":
        state["output.weight"] = torch.ones(C3, hidden, 1)
    elif damage == "shape":
        state["projection.weight"] = torch.ones(hidden, hidden + 1)
    elif damage == "int_key":
        state[7] = torch.ones(2)  # type: ignore[index]
    elif damage == "list":
        state = list(state.values())  # type: ignore[assignment]
    if damage in ("html", "text", "lfs", "empty"):
        bad.write_bytes({"html": HTML, "text": TEXT, "lfs": LFS, "empty": b""}[damage])
    elif damage == "legacy":
        torch.save(state, bad, _use_new_zipfile_serialization=False)
    else:
        _save(bad, state)
        if damage == "deflated":
            deflated(bad)
    _refused(tmp_path, capsys, bad, *needles)


def test_a_nan_weight_with_data_blames_the_file_not_the_data(tiny_dataset: Path, tmp_path: Path, capsys) -> None:
    bad = write_release(tmp_path / "release")["3Dto2D"]
    state = cfm_state(C3, C2)
    state["input.weight"][0, 0] = float("nan")
    _save(bad, state)
    line = _refused(tmp_path, capsys, bad, "'input.weight'", extra=("--data", str(tiny_dataset)))
    assert str(tiny_dataset) not in line


def test_a_failed_import_leaves_no_hidden_folder_and_a_good_one_follows_the_umask(tmp_path: Path, capsys) -> None:
    write_release(tmp_path / "release")
    missing = tmp_path / "no-such-data"
    assert main(_import(tmp_path, "--data", str(missing))) == 1
    assert str(missing) in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release"]  # no .run.import-XXXX left beside --out
    previous = os.umask(0o027)
    try:
        assert main(_import(tmp_path)) == 0
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "run").stat().st_mode) == 0o750  # as a trained run's folder, not mkdtemp's 0700


_BOMB_SCRIPT = """
import json, resource, sys
import torch
import mmiad.cli.main, mmiad.methods.cfm.official, mmiad.features.registry
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
code = mmiad.cli.main.main(sys.argv[1:])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"code": code, "grown_mb": (after - before) / 1024}))
"""


def test_a_stride0_bomb_is_refused_with_bounded_memory(tmp_path: Path) -> None:
    """A ~1 KB file declaring 15000-channel layers: the MLP it sizes would take 2.7 GB; refused with < 500 MB."""
    bad = write_release(tmp_path / "release")["2Dto3D"]
    wide = 15_000
    _save(bad, {f"{k}.weight": stride0((wide, wide)) for k in ("input", "projection", "output")}
          | {f"{k}.bias": stride0((wide,)) for k in ("input", "projection", "output")})  # fmt: skip
    assert bad.stat().st_size < 20_000
    environment = {**os.environ, "PYTHONPATH": str(Path(mmiad.__file__).parents[1])}
    done = subprocess.run(
        [sys.executable, "-c", _BOMB_SCRIPT, *_import(tmp_path)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
        check=False,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    lines = done.stderr.strip().splitlines()
    assert result["code"] == 1 and len(lines) == 1 and str(bad) in lines[0] and "stride-0" in lines[0]
    assert result["grown_mb"] < 500, result
    print(f"stride-0 bomb refused; peak RSS grew {result['grown_mb']:.0f} MB during the import")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release"]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    key=st.sampled_from(["input.weight", "input.bias", "projection.weight", "output.weight", "output.bias"]),
    damage=st.sampled_from(["nan", "inf", "stride0", "flatten", "unsqueeze", "empty"]),
    where=st.floats(0.0, 1.0),
)
def test_any_damaged_tensor_is_refused_naming_the_file(tmp_path: Path, key: str, damage: str, where: float) -> None:
    """Whatever tensor is damaged and however, the importer raises one CheckpointError naming the file."""
    files = {"2Dto3D": tmp_path / "CFM_2Dto3D_puck_1ep_1bs.pth", "3Dto2D": tmp_path / "CFM_3Dto2D_puck_1ep_1bs.pth"}
    _save(files["3Dto2D"], cfm_state(C3, C2))
    state = cfm_state(C2, C3)
    tensor = state[key]
    if damage in ("nan", "inf"):
        flat = tensor.view(-1)
        flat[min(int(where * flat.numel()), flat.numel() - 1)] = float("nan" if damage == "nan" else "inf")
    elif damage == "stride0":
        state[key] = stride0(tuple(tensor.shape) if tensor.numel() > 1 else (5,))
    elif damage == "flatten":
        state[key] = tensor.reshape(-1, 1, 1) if tensor.ndim == 1 else tensor.reshape(-1)
    elif damage == "unsqueeze":
        state[key] = tensor.unsqueeze(0)
    else:
        state[key] = tensor[:0]
    _save(files["2Dto3D"], state)
    with pytest.raises(CheckpointError) as refused:
        import_cfm_pair(files)
    assert refused.value.path == files["2Dto3D"]


@pytest.mark.parametrize(
    ("books", "needle"),
    [
        ("zero_codes", "empty codebook"),
        ("no_codes", "empty codebook"),
        ("nan", "NaN or infinite"),
        ("stride0", "stride-0"),
        ("wrong_dim", "shape mismatches"),
    ],
)
def test_hostile_orq_codebooks_are_refused_naming_the_file_and_tensor(tmp_path: Path, books: str, needle: str) -> None:
    generator = torch.Generator().manual_seed(0)
    good_2d, good_3d = [torch.randn(16, C2, generator=generator)], [torch.randn(16, C3, generator=generator)]
    bad = {
        "zero_codes": torch.zeros(16, C2),
        "no_codes": torch.zeros(0, C2),
        "nan": good_2d[0].clone().index_fill_(0, torch.tensor([3]), float("nan")),
        "stride0": stride0((200_000, C2)),  # the 10 KB file that became a 336 MB model file
        "wrong_dim": torch.randn(16, C2 + 1, generator=generator),
    }[books]
    path = orq_file(tmp_path / "UniRCM_ORQ_x.pth", [bad], good_3d)
    assert load_official_orq(orq_file(tmp_path / "UniRCM_ORQ_ok.pth", good_2d, good_3d), C2, C3)[0][0].shape == (16, C2)
    with pytest.raises(CheckpointError, match=needle) as refused:
        load_official_orq(path, C2, C3)
    assert refused.value.path == path
    if books in ("zero_codes", "no_codes", "nan"):
        assert "rgb_codebook.layers.0.embed" in str(refused.value)


def test_a_nan_in_m3dms_uff_is_refused_at_import(tiny_dataset: Path, tmp_path: Path, capsys) -> None:
    """Before this round the NaN reached the memory bank and exited 4; now the file is refused up front."""
    state = uff_state()
    name = next(k for k, v in state.items() if v.ndim == 2)
    state[name][1, 2] = float("nan")
    bad = _save(tmp_path / "checkpoint-0.pth", {"model": state, "epoch": 0})
    with pytest.raises(CheckpointError, match=f"'{name}' has 1 NaN") as refused:
        load_official_uff(bad)
    assert refused.value.path == bad
    out = tmp_path / "run"
    args = ["import", "--method", "m3dm", "--from", str(bad), "--out", str(out), "--data", str(tiny_dataset)]
    before = tree(tmp_path)
    assert main([*args, "--extractors", "weightfree"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0] and name in lines[0]
    assert tree(tmp_path) == before


@pytest.mark.parametrize("content", [HTML, TEXT, LFS, b"", b"\x00\x01garbage" * 10, b"PK\x03\x04truncated zip"])
def test_text_html_and_garbage_posing_as_a_checkpoint_are_clear_errors(tmp_path: Path, content: bytes) -> None:
    """The reader every checkpoint goes through (backbones too): a CheckpointError naming the file, never
    torch.load's KeyError/IndexError (exit 4) nor "pickled Python objects" for a web page."""
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as refused:
        read_checkpoint(path)
    assert refused.value.path == path and "pickled Python objects" not in refused.value.problem
    if content == HTML:
        assert "HTML page" in refused.value.problem
