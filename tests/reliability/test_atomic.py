"""Atomic, tidy writes: temp file + rename, normal permissions, stale temporary files ignored and cleaned up."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest
import torch

from mmiad.features.cache import FeatureCache
from mmiad.methods.modelfile import save_model_file
from mmiad.utils.atomic import STALE_AFTER_S, write_json, write_text, write_with


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_model_files_and_outputs_get_normal_permissions(tmp_path: Path, umask_022) -> None:
    model = save_model_file(tmp_path / "m.safetensors", {"w": torch.zeros(2)}, {"method": "cfm"})
    text = write_text(tmp_path / "a" / "b.txt", "x")
    assert _mode(model) == 0o644 and _mode(text) == 0o644  # not mkstemp's 0o600
    os.umask(0o077)
    assert _mode(write_json(tmp_path / "c.json", {})) == 0o600  # the umask is honoured


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path: Path) -> None:
    target = write_text(tmp_path / "run.json", "old")

    def crash(temp: Path) -> None:
        temp.write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        write_with(target, crash)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


def test_stale_temporaries_are_removed_on_the_next_write_young_ones_kept(tmp_path: Path) -> None:
    target = tmp_path / "m.safetensors"
    stale = tmp_path / ".m.safetensors.dead.tmp.safetensors"
    young = tmp_path / ".m.safetensors.live.tmp.safetensors"
    other = tmp_path / ".n.safetensors.dead.tmp.safetensors"
    for path in (stale, young, other):
        path.write_bytes(b"partial")
    old = time.time() - STALE_AFTER_S - 10
    os.utime(stale, (old, old))
    os.utime(other, (old, old))
    save_model_file(target, {"w": torch.ones(1)}, {"method": "cfm"})
    assert not stale.exists() and young.exists() and other.exists()  # only this target's, only when stale


def test_cache_report_ignores_temporary_files(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path)
    cache.put("ab" + "0" * 62, {"x": torch.zeros(4)})
    before = cache.report()
    (tmp_path / "ab" / f".{'ab' + '0' * 62}.safetensors.dead.tmp.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / "ab" / ".tmp-old.safetensors").write_bytes(b"x" * 1000)  # earlier releases' naming
    assert cache.report() == before and before.entries == 1
