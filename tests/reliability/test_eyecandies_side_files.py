"""Eyecandies side files with a warm feature cache: an edited ``pose.txt`` or ``info_depth.yaml`` is a new cache
key (the features are recomputed and the scores are those of a cold cache), a damaged one is reported by name in
training; and every dataset format declares the files it reads, or it cannot register."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from mmiad.cli.main import main
from mmiad.data.eyecandies import read_pose
from mmiad.data.formats import DatasetFormat, feature_files, open_dataset, register_format
from mmiad.data.mvtec3d import list_records
from mmiad.data.sample import SampleRecord
from mmiad.engine import load_trained, predict_records, run_models, train_run

from .conftest import TINY


@pytest.fixture(scope="module")
def trained_eyecandies(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(dataset, CFM run, warm feature cache) on a tiny native Eyecandies ``puck``."""
    work = tmp_path_factory.mktemp("eyecandies_side")
    root = work / "data"
    synth = ["synth", "--out", str(root), "--preset", "tiny", "--categories", "puck", "--format", "eyecandies"]
    assert main(synth) == 0
    train_run("cfm", root, work / "run", hparams=TINY, cache_dir=str(work / "cache"))
    return root, work / "run", work / "cache"


def _entries(cache: Path) -> int:
    return sum(1 for _ in cache.rglob("*.safetensors"))


def _scores(run: Path, cache: Path, records: list[SampleRecord]) -> dict[str, float]:
    trained = load_trained(run_models(run)["puck"], cache_dir=str(cache))
    return {p.record.stem: p.pred_score for p in predict_records(trained, records)}


def _edit(record: SampleRecord, side: str) -> Path:
    """A plausible edit of one side file (a re-calibrated camera): a 2° turn of the pose, or a 1% wider depth
    range."""
    extra = record.extra_dict()
    if side == "pose":
        path = Path(extra["pose_path"])
        pose = read_pose(path)
        angle = np.deg2rad(2.0)
        turn = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
        pose[:3, :3] = turn @ pose[:3, :3]
        np.savetxt(path, pose)
    else:
        path = Path(extra["info_depth_path"])
        text = path.read_text()
        key = "max: "
        start = text.index(key) + len(key)
        end = text.index("\n", start)
        path.write_text(f"{text[:start]}{float(text[start:end]) * 1.01!r}{text[end:]}")
    return path


@pytest.mark.parametrize("side", ["pose", "info_depth"])
def test_an_edited_side_file_is_a_new_cache_key(trained_eyecandies, tmp_path: Path, side: str) -> None:
    source, run, warm = trained_eyecandies
    root = tmp_path / "data"
    shutil.copytree(source, root)  # same contents, so the warm cache answers for these files too
    cache = tmp_path / "cache"
    shutil.copytree(warm, cache)
    records = open_dataset(root).records("puck", "test")[:4]
    before = _scores(run, cache, records)
    entries = _entries(cache)
    _edit(records[1], side)
    after = _scores(run, cache, records)
    assert _entries(cache) == entries + 1  # one sample's features recomputed, the others reused
    assert after[records[1].stem] != before[records[1].stem]
    assert after[records[1].stem] == _scores(run, tmp_path / "cold", [records[1]])[records[1].stem]  # not stale
    assert {k: v for k, v in after.items() if k != records[1].stem} == {
        k: v for k, v in before.items() if k != records[1].stem
    }  # no other sample lost or changed


def test_damaged_side_files_of_training_samples_are_named(trained_eyecandies, tmp_path: Path, capsys) -> None:
    """With a warm cache the damaged poses used to be skipped silently ("training on 6 nominal samples")."""
    source, _, warm = trained_eyecandies
    root = tmp_path / "data"
    shutil.copytree(source, root)
    train = open_dataset(root).records("puck", "train")
    damaged = [Path(train[0].extra_dict()["pose_path"]), Path(train[2].extra_dict()["info_depth_path"])]
    damaged[0].write_text("1 0 0\nnot a pose\n")
    damaged[1].write_text("normalization:\n  min: 2.0\n  max: 1.0\n")
    out = tmp_path / "run"
    args = ["train", "--method", "cfm", "--data", str(root), "--out", str(out), "--cache-dir", str(warm)]
    assert main([*args, *(f"--set={k}={v}" for k, v in TINY.items())]) == 0
    err = capsys.readouterr().err
    for path in damaged:  # each named once, on its own line, with the problem
        assert err.count(f"  - {path}: ") == 1, err
    assert (out / "puck.safetensors").is_file() and not list(tmp_path.glob(".*"))


def test_mvtec_records_keep_their_cache_key_and_eyecandies_declares_every_file(
    tiny_dataset: Path, trained_eyecandies
) -> None:
    record = list_records(tiny_dataset, "puck", "test")[-1]
    assert record.gt_path is not None
    assert feature_files(record) == [record.rgb_path, record.xyz_path]  # the key of existing caches
    eyecandies = open_dataset(trained_eyecandies[0]).records("puck", "test")
    bad = next(r for r in eyecandies if r.gt_path is not None)
    extra = bad.extra_dict()
    assert feature_files(bad) == [bad.rgb_path, bad.xyz_path, Path(extra["info_depth_path"]), Path(extra["pose_path"])]
    declared = open_dataset(trained_eyecandies[0]).sample_files(bad)
    assert declared["gt"] == bad.gt_path and set(declared) == {"rgb", "xyz", "info_depth", "pose", "gt"}


def test_a_format_that_reads_more_files_must_declare_them() -> None:
    class Forgetful(DatasetFormat):
        @classmethod
        def detect(cls, root: Path) -> bool:
            return False

        def categories(self) -> list[str]:
            return []

        def records(self, category: str, split: str, *, errors=None) -> list[SampleRecord]:
            return []

        @classmethod
        def read_xyz(cls, record: SampleRecord) -> np.ndarray:
            return np.zeros((2, 2, 3), np.float32)

    with pytest.raises(TypeError, match="overrides read_xyz but not sample_files"):
        register_format("forgetful")(Forgetful)
