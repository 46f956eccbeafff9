"""The report of a tiny trained run: same metrics as ``mmiad test``, worst first, self-contained, bounded."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from mmiad.engine import evaluate_run, load_trained, run_models
from mmiad.metrics import METRIC_KEYS
from mmiad.report import ReportOptions, collect_report

pytestmark = pytest.mark.slow


def test_metrics_table_matches_evaluate_run(tiny_run: tuple[Path, Path, str], tiny_report: Path) -> None:
    data, run, cache = tiny_run
    expected, _ = evaluate_run(run, data, cache_dir=cache)
    page = tiny_report.read_text()
    for category, metrics in [*expected["per_category"].items(), ("mean", expected["mean"])]:
        row = re.search(rf'<tr class="\w+" data-category="{category}">(.*?)</tr>', page)
        assert row, category
        for key in METRIC_KEYS:
            cell = re.search(rf'<td data-key="{re.escape(key)}" data-value="([^"]*)">([^<]*)</td>', row.group(1))
            assert cell, (category, key)
            if metrics[key] is None:
                assert cell.group(1) == ""
            else:
                assert float(cell.group(1)) == pytest.approx(metrics[key], abs=1e-12)
                assert cell.group(2) == f"{metrics[key]:.3f}"


def test_page_is_self_contained_and_bounded(tiny_report: Path) -> None:
    page = tiny_report.read_text()
    assert "http://" not in page and "https://" not in page
    sources = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert sources and all(s.startswith("data:") for s in sources)
    assert "<script src" not in page and "@import" not in page and "url(" not in page
    assert tiny_report.stat().st_size < 1_000_000
    payload = json.loads(re.search(r'<script type="application/json" id="mmiad-clouds">(.*?)</script>', page).group(1))
    assert 1 <= len(payload["clouds"]) <= 2 * 3  # 2 categories, 3 clouds each at most
    assert all(c["count"] <= 20_000 for c in payload["clouds"])


def test_gallery_is_worst_first_with_all_pictures(tiny_run: tuple[Path, Path, str]) -> None:
    data, run, cache = tiny_run
    options = ReportOptions(max_samples=3, thumb_size=40, max_points=50, clouds=1)
    report = collect_report(run, data, options=options, cache_dir=cache)
    assert [c.name for c in report.categories] == sorted(run_models(run))
    for category in report.categories:
        threshold = load_trained(run / f"{category.name}.safetensors").thresholds.image
        assert category.thresholds.image == threshold
        assert len(category.gallery) == min(3, category.counts["samples"])
        margins = [(v.score - threshold) if v.label == 0 else (threshold - v.score) for v in category.gallery]
        assert margins == sorted(margins, reverse=True)
        for view in category.gallery:
            assert view.verdict == ("FP" if view.score > threshold else "TN") if view.label == 0 else True
            assert {"RGB", "depth (z)", "ground truth", "final map", "2d map", "3d map"} <= set(view.pictures)
        assert category.gallery[0].cloud is not None and category.gallery[0].cloud.count <= 50
        assert all(v.cloud is None for v in category.gallery[1:])
        fpr, tpr = category.roc
        assert fpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
        pro_fpr, _ = category.pro
        assert pro_fpr[-1] == pytest.approx(0.3) and np.all(np.diff(pro_fpr) >= 0)


def test_bad_options_are_clear_errors(tiny_run: tuple[Path, Path, str]) -> None:
    data, run, cache = tiny_run
    with pytest.raises(ValueError, match="report sizes"):
        collect_report(run, data, options=ReportOptions(thumb_size=0), cache_dir=cache)
