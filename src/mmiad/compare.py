"""Side-by-side comparison of trained runs: the four metrics plus test throughput and peak memory.

The seeds' tables (metrics per category and their mean, next to speed and memory) are what a user needs to pick
a method for a line. Each run is tested in its own child process so its peak resident memory is its own: a
child reports its ``ru_maxrss`` itself, which avoids ``RUSAGE_CHILDREN`` (a maximum over *all* children so far,
useless once a bigger run has gone before). Throughput counts every test sample of the evaluated categories over
the wall time of the whole test (model loading, features, scoring, metrics), with a cold feature cache unless a
``cache_dir`` is given (a warm cache skips feature extraction and overstates throughput).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmiad.metrics.report import COLUMN_TITLES, METRIC_KEYS
from mmiad.utils.memory import own_peak_rss_mb

_WORKER_FLAG = "--compare-worker"


def _measure(run: str, data_root: str, cache_dir: str, format: str = "auto", device: str = "") -> dict[str, Any]:
    """Test one run in this process and report metrics, sample count, seconds and own peak RSS (and the
    device's own peak memory on CUDA)."""
    from mmiad.data.formats import open_dataset
    from mmiad.engine import evaluate_run
    from mmiad.utils.compute import resolve_device, synchronize

    on = resolve_device(device or "auto")
    started = time.perf_counter()
    overrides = {"device": device} if device else None
    result, errors = evaluate_run(run, data_root, cache_dir=cache_dir, format=format, overrides=overrides)
    synchronize(on)
    seconds = time.perf_counter() - started
    dataset = open_dataset(data_root, format)
    samples = sum(len(dataset.records(category, "test")) for category in result["per_category"])
    samples -= len(errors)
    measured = {"result": result, "samples": samples, "seconds": seconds, "peak_rss_mb": own_peak_rss_mb()}
    measured["device"] = str(on)
    if on.type == "cuda":
        import torch

        measured["peak_device_mb"] = torch.cuda.max_memory_allocated(on) / 2**20
    return measured


def _method_of(run: Path) -> str:
    index = run / "run.json"
    return str(json.loads(index.read_text()).get("method", "?")) if index.is_file() else "?"


def compare_runs(
    data_root: str | Path,
    runs: Sequence[str | Path],
    *,
    cache_dir: str | Path | None = None,
    format: str | None = None,
    device: str | None = None,
) -> list[dict]:
    """Test each run in a child process; one row per run.

    Args:
        data_root: Dataset root (any registered format) with the test split.
        runs: Run folders written by ``mmiad train``.
        cache_dir: Shared cache folder; None gives each run a fresh temporary one (cold, honest throughput).
        format: Dataset format name; detected from the root by default.
        device: Where the runs are tested (default: each model's own device, or ``auto``).

    Returns:
        Dicts with ``run``, ``method``, ``result`` (``{"per_category": …, "mean": …}`` as ``evaluate_run``),
        ``samples``, ``seconds``, ``samples_per_s`` and ``peak_rss_mb`` (the child's peak resident memory).

    Raises:
        RuntimeError: If a child fails, with its error output.
    """
    rows = []
    for run in runs:
        run_path = Path(run)
        with tempfile.TemporaryDirectory(prefix="mmiad-compare-") as scratch:
            cache = str(cache_dir) if cache_dir is not None else scratch
            command = [sys.executable, "-m", "mmiad.compare", _WORKER_FLAG, str(run_path), str(data_root), cache]
            command += [format or "auto", device or ""]
            child = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy(), check=False)
        if child.returncode != 0:
            raise RuntimeError(f"testing {run_path} failed (exit {child.returncode}):\n{child.stderr[-4000:]}")
        measured = json.loads(child.stdout.strip().splitlines()[-1])
        seconds = measured["seconds"]
        rows.append(
            {
                "run": str(run_path),
                "method": _method_of(run_path),
                **measured,
                "samples_per_s": measured["samples"] / seconds if seconds > 0 else math.nan,
            }
        )
    return rows


def _cell(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


def comparison_markdown(rows: Sequence[dict]) -> str:
    """Markdown: one table per category and one for the mean, a line per run (metrics, samples/s, peak MB).

    Speed and memory are whole-test figures of a run, so they repeat in every category's table.
    """
    if not rows:
        return "_no runs to compare_\n"
    categories: list[str] = []
    for row in rows:
        categories += [c for c in row["result"]["per_category"] if c not in categories]
    header = ["run", "method", *COLUMN_TITLES, "samples/s", "peak MB"]
    out: list[str] = []
    for title in [*categories, "mean"]:
        out += [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in rows:
            metrics = row["result"]["mean"] if title == "mean" else row["result"]["per_category"].get(title, {})
            cells = [Path(row["run"]).name, row["method"], *(_cell(metrics.get(key)) for key in METRIC_KEYS)]
            cells += [_cell(row.get("samples_per_s"), 2), _cell(row.get("peak_rss_mb"), 0)]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__" and len(sys.argv) == 7 and sys.argv[1] == _WORKER_FLAG:
    print(json.dumps(_measure(*sys.argv[2:7])))
