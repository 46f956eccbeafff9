"""Render a collected :class:`~mmiad.report.build.Report` as one self-contained HTML page.

Everything the page needs is inside it (pictures as PNG data URIs, plots as inline SVG, the viewer as inline
script, clouds as inline JSON), so it can be mailed, archived with a run, or opened on a machine with no network.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from html import escape
from typing import Any

from mmiad.metrics.report import COLUMN_TITLES, METRIC_KEYS
from mmiad.report.images import ramp_colors
from mmiad.report.model import CategoryReport, Report, SampleView
from mmiad.report.plots import svg_curve
from mmiad.report.viewer import STYLE, VIEWER_JS

VIEWER_SIZE = (640, 480)


def format_metric(value: float | None) -> str:
    """Three decimals like ``mmiad test``'s table, a dash for an undefined value."""
    return "–" if value is None else f"{value:.3f}"


def metrics_table(summary: Mapping[str, Any]) -> str:
    """Per-category rows and the mean; each cell carries the full value in ``data-value`` for exact checks."""

    def row(name: str, metrics: Mapping[str, float | None], css: str) -> str:
        cells = "".join(
            f'<td data-key="{escape(key)}" data-value="{"" if metrics.get(key) is None else repr(metrics[key])}">'
            f"{format_metric(metrics.get(key))}</td>"
            for key in METRIC_KEYS
        )
        return f'<tr class="{css}" data-category="{escape(name)}"><td>{escape(name)}</td>{cells}</tr>'

    head = "".join(
        f'<th data-key="{escape(k)}">{escape(t)}</th>' for k, t in zip(METRIC_KEYS, COLUMN_TITLES, strict=True)
    )
    rows = [row(name, metrics, "category") for name, metrics in summary["per_category"].items()]
    rows.append(row("mean", summary["mean"], "mean"))
    return f'<table class="metrics" id="metrics"><tr><th>category</th>{head}</tr>{"".join(rows)}</table>'


def _thresholds_line(category: CategoryReport) -> str:
    counts = category.counts
    text = f"{counts['samples']} test samples ({counts['good']} good, {counts['defective']} defective)"
    thresholds = category.thresholds
    if thresholds is None:
        return text + "; no calibrated thresholds, so the gallery alternates the worst good and defective samples"
    return (
        f"{text}; image threshold {thresholds.image:.4g}, pixel threshold {thresholds.pixel:.4g} "
        f"(max FPR {thresholds.max_fpr:g}, calibrated on {escape(thresholds.source)})"
    )


def sample_card(view: SampleView, cloud_index: int | None) -> str:
    """One gallery card: verdict, score and every picture with its caption."""
    figures = []
    for title, uri in view.pictures.items():
        caption = escape(title) + (f"<br>{escape(view.captions[title])}" if title in view.captions else "")
        figures.append(f'<figure><img src="{uri}" alt="{escape(title)}"><figcaption>{caption}</figcaption></figure>')
    button = "" if cloud_index is None else f' <button type="button" data-cloud="{cloud_index}">3D view</button>'
    head = (
        f'<span class="badge">{escape(view.verdict)}</span> <b>{escape(view.defect_type)}/{escape(view.name)}</b> '
        f"score {view.score:.4g}{button}"
    )
    return (
        f'<div class="card {escape(view.verdict)}" data-score="{view.score!r}" data-label="{view.label}">'
        f'<div class="head">{head}</div><div class="pictures">{"".join(figures)}</div></div>'
    )


def category_section(category: CategoryReport, cloud_indices: Mapping[int, int]) -> str:
    """Curves and the worst-first gallery of one category."""
    roc = svg_curve(
        *(category.roc or (None, None)),
        title=f"{category.name}: image ROC",
        x_label="false positive rate",
        y_label="true positive rate",
        chance=True,
        css_class="roc",
    )
    pro = svg_curve(
        *(category.pro or (None, None)),
        title=f"{category.name}: PRO (FPR ≤ 0.3)",
        x_label="false positive rate",
        y_label="per-region overlap",
        x_max=0.3,
        css_class="pro",
    )
    cards = [sample_card(view, cloud_indices.get(id(view))) for view in category.gallery]
    return (
        f'<section class="category" id="category-{escape(category.name)}" data-category="{escape(category.name)}">'
        f'<h2>{escape(category.name)}</h2><p class="meta">{_thresholds_line(category)}</p>'
        f'<div class="plots">{roc}{pro}</div>'
        f"<h3>Samples, worst first</h3>"
        f'<div class="gallery">{"".join(cards) or "<p>no sample to show</p>"}</div></section>'
    )


# Characters that must never appear raw inside a <script> element: ``<`` starts ``</script>`` and ``<!--``
# (which switches the HTML parser into a mode where a later ``<script>`` swallows the rest of the page), ``>`` and
# ``&`` for good measure, U+2028/U+2029 because older JavaScript engines treat them as line ends. JSON allows each
# as a ``\\uXXXX`` escape, so ``JSON.parse`` gives back the same strings.
_SCRIPT_ESCAPES = {ord("<"): "\\u003c", ord(">"): "\\u003e", ord("&"): "\\u0026", 0x2028: "\\u2028", 0x2029: "\\u2029"}


def _script_json(data: Any) -> str:
    """JSON that is inert inside a <script> element, whatever strings (file names, titles) it holds."""
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).translate(_SCRIPT_ESCAPES)


def render_report(report: Report) -> str:
    """The whole page as a string."""
    clouds: list[dict[str, Any]] = []
    cloud_indices: dict[int, int] = {}
    for category in report.categories:
        for view in category.gallery:
            if view.cloud is not None:
                cloud_indices[id(view)] = len(clouds)
                title = f"{category.name} / {view.defect_type}/{view.name} ({view.verdict}, score {view.score:.4g})"
                clouds.append({**view.cloud.to_json(), "title": title})
    options = "".join(f'<option value="{i}">{escape(c["title"])}</option>' for i, c in enumerate(clouds))
    width, height = VIEWER_SIZE
    viewer = (
        '<section id="viewer-section"><h2>3D view</h2>'
        '<p class="meta">Points coloured by the final anomaly map (same scale as the overlays).</p>'
        f'<select id="mmiad-cloud-select">{options}</select> <span id="mmiad-viewer-info" class="meta"></span><br>'
        f'<canvas id="mmiad-viewer" width="{width}" height="{height}"></canvas></section>'
        if clouds
        else '<section id="viewer-section"><h2>3D view</h2><p>no point cloud to show</p></section>'
    )
    skipped = ""
    if report.skipped:
        items = "".join(f"<li>{escape(line)}</li>" for line in report.skipped)
        skipped = f"<h2>Skipped files</h2><ul>{items}</ul>"
    sections = "".join(category_section(c, cloud_indices) for c in report.categories)
    payload = _script_json({"ramp": ramp_colors(), "clouds": clouds})
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="icon" href="data:,">'
        f"<title>mmiad report: {escape(report.method)}</title><style>{STYLE}</style></head><body>"
        f"<h1>mmiad report — {escape(report.method)}</h1>"
        f'<p class="meta">run {escape(report.run)}<br>data {escape(report.data_root)}</p>'
        f"<h2>Metrics</h2>{metrics_table(report.summary)}"
        f"{viewer}{sections}{skipped}"
        f'<script type="application/json" id="mmiad-clouds">{payload}</script>'
        f"<script>{VIEWER_JS}</script></body></html>\n"
    )
