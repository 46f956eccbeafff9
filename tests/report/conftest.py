"""A tiny trained run and its report, built once for the report tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmiad.cli.main import main


@pytest.fixture(scope="session")
def tiny_run(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """(dataset, run folder, cache folder) of a 3-epoch CFM run at 64 px."""
    base = tmp_path_factory.mktemp("report_run")
    run, cache = base / "run", str(base / "cache")
    args = ["train", "--method", "cfm", "--data", str(tiny_dataset), "--out", str(run), "--epochs", "3"]
    assert main([*args, "--image-size", "64", "--grid-size", "32", "--cache-dir", cache]) == 0
    return tiny_dataset, run, cache


@pytest.fixture(scope="session")
def tiny_report(tiny_run: tuple[Path, Path, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``index.html`` of the tiny run, written through the ``report`` sub-command."""
    import argparse

    from mmiad.cli import report_command

    data, run, cache = tiny_run
    out = tmp_path_factory.mktemp("report_page")
    parser = argparse.ArgumentParser()
    report_command.register(parser.add_subparsers())
    args = parser.parse_args(
        [
            "report",
            "--run",
            str(run),
            "--data",
            str(data),
            "--out",
            str(out),
            "--cache-dir",
            cache,
            "--max-samples",
            "4",
        ]
    )
    assert args.handler(args) == 0
    return out / "index.html"
