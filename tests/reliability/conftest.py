"""A tiny trained CFM run shared by the hostile-input tests (one category, fallback models included)."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from mmiad.data.sample import SampleRecord

TINY = {"image_size": 64, "grid_size": 32, "epochs": 2, "batch_size": 2}


@pytest.fixture(scope="session")
def hostile_run(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(run folder, cache folder) of a CFM model for ``puck``; tests must copy the run before tampering with it."""
    from mmiad.engine import train_run

    work = tmp_path_factory.mktemp("hostile")
    train_run("cfm", tiny_dataset, work / "run", categories=["puck"], hparams=TINY, cache_dir=str(work / "cache"))
    return work / "run", work / "cache"


def copy_record(record: SampleRecord, folder: Path) -> SampleRecord:
    """The record with its RGB and xyz files copied into ``folder`` (so a test can corrupt them)."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb, xyz = folder / record.rgb_path.name, folder / record.xyz_path.name
    shutil.copy(record.rgb_path, rgb)
    shutil.copy(record.xyz_path, xyz)
    return replace(record, rgb_path=rgb, xyz_path=xyz)


def tree(root: Path) -> dict[str, int]:
    """Every file under ``root`` with its size: a snapshot to show that nothing was written outside a folder."""
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}
