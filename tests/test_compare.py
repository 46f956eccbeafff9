from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mmiad.compare import compare_runs, comparison_markdown
from mmiad.data.mvtec3d import list_records
from mmiad.engine import evaluate_run, train_run
from mmiad.utils.memory import own_peak_rss_mb


def _row(name: str, method: str, i_auroc: float | None) -> dict:
    metrics = {
        "image_auroc": i_auroc,
        "pixel_auroc": 0.9,
        "aupro@0.3": 0.5,
        "aupro@0.1": 0.25,
        "aupro@0.05": 0.125,
        "aupro@0.01": None,
    }
    return {
        "run": f"/runs/{name}",
        "method": method,
        "result": {"per_category": {"puck": metrics}, "mean": metrics},
        "samples_per_s": 12.345,
        "peak_rss_mb": 812.4,
    }


def test_markdown_has_one_table_per_category_and_mean() -> None:
    text = comparison_markdown([_row("a", "btf", 0.75), _row("b", "m3dm", None)])
    assert text.count("### ") == 2 and "### puck" in text and "### mean" in text
    assert "| a | btf | 0.750 | 0.900 | 0.500 | 0.250 | 0.125 | - | 12.35 | 812 |" in text
    assert "| b | m3dm | - | 0.900 | 0.500 | 0.250 | 0.125 | - | 12.35 | 812 |" in text
    assert "I-AUROC | P-AUROC | AUPRO@30% | AUPRO@10% | AUPRO@5% | AUPRO@1% | samples/s | peak MB" in text


def test_compare_runs_measures_each_run_in_a_child(tiny_dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "btf-run"
    hparams = {"image_size": 64, "grid_size": 8, "knn_backend": "torch"}
    train_run("btf", tiny_dataset, run, categories=["puck"], hparams=hparams, cache_dir=str(tmp_path / "c"))
    (row,) = compare_runs(tiny_dataset, [run], cache_dir=tmp_path / "c")
    expected, _ = evaluate_run(run, tiny_dataset, cache_dir=str(tmp_path / "c"))
    assert row["method"] == "btf" and row["result"] == expected
    assert row["samples"] == len(list_records(tiny_dataset, "puck", "test"))
    assert row["samples_per_s"] == pytest.approx(row["samples"] / row["seconds"])
    assert 50 < row["peak_rss_mb"] < 8000  # a real Python+torch process, in MB


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the pre-exec inheritance is Linux behaviour")
def test_peak_memory_of_a_child_excludes_its_parent() -> None:
    # ru_maxrss would report the parent's ~460 MB in the child too (the pre-exec copy counts on Linux).
    ballast = np.ones(60_000_000)  # 458 MiB, touched
    assert own_peak_rss_mb() > 450
    code = "from mmiad.utils.memory import own_peak_rss_mb; print(own_peak_rss_mb())"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert 1 < float(child.stdout) < 200
    del ballast
