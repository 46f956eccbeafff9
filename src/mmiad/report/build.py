"""Collect what the visual report shows from a trained run: metrics, curves, worst samples and point clouds.

Predictions stream one at a time. Of each, the report keeps the final map and ground truth at the model
resolution (what the metrics need, as ``mmiad test`` keeps) and, only for the gallery candidates, thumbnails and a
subsampled cloud; modality maps and the input tensors are dropped as soon as the thumbnails are made.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_curve

from mmiad.data.errors import DataError
from mmiad.data.formats import open_dataset
from mmiad.engine import Log, RunModels, evaluate_predictions, quiet, served_categories
from mmiad.methods.base import Prediction
from mmiad.metrics import pro_curve, summarize
from mmiad.metrics.pro import AuproMode
from mmiad.postprocess.threshold import Thresholds
from mmiad.report import images
from mmiad.report.gallery import WorstFirst, verdict
from mmiad.report.html import render_report
from mmiad.report.model import CategoryReport, Report, SampleView
from mmiad.report.plots import clip_curve
from mmiad.utils.atomic import write_text

PRO_LIMIT = 0.3


@dataclass(frozen=True)
class ReportOptions:
    """Size limits that keep the page (and the memory used to build it) bounded.

    Attributes:
        max_samples: Gallery cards per category.
        thumb_size: Longest side of every picture.
        max_points: Points per embedded cloud.
        clouds: Gallery cards per category (from the worst) whose point cloud is embedded for the 3D view.
        aupro_mode: PRO curve variant, as ``mmiad test --aupro``.
    """

    max_samples: int = 12
    thumb_size: int = images.DEFAULT_THUMB
    max_points: int = images.DEFAULT_POINTS
    clouds: int = 3
    aupro_mode: AuproMode = "exact"


def overlay_scale(prediction: Prediction, thresholds: Thresholds | None) -> float:
    """Value drawn full red: twice the pixel threshold (as ``mmiad predict``), else the map's own maximum."""
    if thresholds is not None and thresholds.pixel > 0:
        return 2.0 * thresholds.pixel
    return float(np.nanmax(prediction.anomaly_map)) or 1.0


def sample_view(
    prediction: Prediction, thresholds: Thresholds | None, options: ReportOptions, with_cloud: bool
) -> SampleView:
    """Thumbnails (RGB, depth, GT, overlay, one heat image per modality map) and optionally the cloud."""
    geometry = prediction.geometry
    size = prediction.anomaly_map.shape
    rgb_tensor = getattr(geometry, "rgb", None)
    rgb = images.unnormalize_rgb(rgb_tensor) if rgb_tensor is not None else np.zeros((*size, 3), np.uint8)
    xyz = getattr(geometry, "xyz", None)
    valid = getattr(geometry, "valid", None)
    scale = overlay_scale(prediction, thresholds)
    pictures = {"RGB": rgb}
    if xyz is not None:
        pictures["depth (z)"] = images.depth_image(xyz, valid)
    pictures["ground truth"] = images.mask_image(prediction.gt_mask, size)
    pictures["final map"] = images.overlay_image(rgb, prediction.anomaly_map, scale)
    captions = {"final map": f"full red at {scale:.4g}"}
    for name, values in prediction.modality_maps.items():
        heat, low, high = images.heat_image(values)
        pictures[f"{name} map"] = heat
        captions[f"{name} map"] = f"{low:.3g} … {high:.3g}"
    cloud = None
    if with_cloud and xyz is not None and np.shape(xyz)[:2] == size:
        cloud = images.make_cloud(xyz, prediction.anomaly_map, valid, scale, options.max_points)
    record = prediction.record
    threshold = thresholds.image if thresholds is not None else None
    return SampleView(
        name=record.stem,
        defect_type=record.defect_type,
        label=int(prediction.label),
        score=float(prediction.pred_score),
        verdict=verdict(float(prediction.pred_score), int(prediction.label), threshold),
        pictures={k: images.png_data_uri(images.thumbnail(v, options.thumb_size)) for k, v in pictures.items()},
        captions=captions,
        cloud=cloud,
    )


def _slim(prediction: Prediction) -> Prediction:
    """What the metrics need, without the input tensors and modality maps (the bulk of a prediction)."""
    return Prediction(
        record=prediction.record,
        pred_score=float(prediction.pred_score),
        anomaly_map=np.asarray(prediction.anomaly_map, np.float32),
        label=int(prediction.label),
        gt_mask=prediction.gt_mask,
        geometry=None,
        metric_maps=dict(prediction.metric_maps),
    )


def curves(predictions: Sequence[Prediction], aupro_mode: AuproMode) -> tuple[Any, Any]:
    """(image ROC, PRO curve up to FPR 0.3), each None when the test set lacks one of the two classes."""
    labels = [p.label for p in predictions]
    roc = None
    if set(labels) == {0, 1}:
        fpr, tpr, _ = roc_curve(labels, [p.pred_score for p in predictions])
        roc = (fpr, tpr)
    masks = [p.gt_mask if p.gt_mask is not None else np.zeros(p.anomaly_map.shape, bool) for p in predictions]
    pro = None
    if any(m.any() for m in masks) and not all(m.all() for m in masks):
        fpr, overlap = pro_curve(masks, [p.map_for("aupro") for p in predictions], mode=aupro_mode)
        pro = clip_curve(fpr, overlap, PRO_LIMIT)
    return roc, pro


def collect_category(
    category: str,
    models: RunModels,
    records: Sequence[Any],
    options: ReportOptions,
    *,
    progress: bool,
    errors: list[DataError],
) -> CategoryReport | None:
    """One category's report, from one pass of predictions; None when no test sample could be used.

    Samples are scored as ``mmiad test`` and ``mmiad predict`` score them; a degraded sample's card is drawn with
    the thresholds that labelled it.
    """
    thresholds = models.trained(models.key_for(category)).thresholds
    gallery: WorstFirst[SampleView] = WorstFirst(options.max_samples)
    kept: list[Prediction] = []
    for prediction in models.predict(list(records), category, progress=progress, errors=errors):
        gallery.offer(
            float(prediction.pred_score),
            int(prediction.label),
            partial(sample_view, prediction, prediction.thresholds, options, with_cloud=options.clouds > 0),
        )
        kept.append(_slim(prediction))
    if not kept:
        return None
    metrics: dict[str, float | None] = dict(evaluate_predictions(kept, aupro_mode=options.aupro_mode))
    roc, pro = curves(kept, options.aupro_mode)
    ordered = [c.item for c in gallery.ordered(thresholds.image if thresholds is not None else None)]
    for view in ordered[options.clouds :]:
        view.cloud = None  # only the worst few clouds go on the page
    labels = [p.label for p in kept]
    counts = {"samples": len(kept), "good": labels.count(0), "defective": labels.count(1)}
    return CategoryReport(category, metrics, roc, pro, ordered, thresholds, counts)


def collect_report(
    run: str | Path,
    data_root: str | Path,
    *,
    categories: Sequence[str] | None = None,
    options: ReportOptions | None = None,
    cache_dir: str | None = None,
    format: str | None = None,
    device: str | None = None,
    progress: bool = False,
    log: Log = quiet,
) -> Report:
    """Predict a run's test split category by category and keep what the report page needs.

    The metrics are computed exactly as ``mmiad test`` computes them (``evaluate_predictions`` on the same
    predictions), so the page's table and the JSON of ``mmiad test --json`` agree.
    """
    options = options or ReportOptions()
    if options.max_samples < 0 or options.thumb_size < 1 or options.clouds < 0:
        raise ValueError(f"report sizes must be non-negative (thumbnail at least 1 px), got {options}")
    models = RunModels(run, cache_dir=cache_dir, overrides={"device": device} if device else None)
    dataset = open_dataset(data_root, format)
    root = dataset.root
    names = served_categories(run, dataset, categories)
    if not names:
        raise DataError(root, "no category of the run found in the dataset")
    errors: list[DataError] = []
    reports: list[CategoryReport] = []
    method = ""
    for category in names:
        method = models.trained(models.key_for(category)).model.name
        records = dataset.records(category, "test", errors=errors)
        report = collect_category(category, models, records, options, progress=progress, errors=errors)
        if report is None:
            log(f"[{category}] no usable test sample")
            continue
        reports.append(report)
        log(f"[{category}] {report.counts['samples']} test samples, {len(report.gallery)} shown")
    summary = summarize({r.name: r.metrics for r in reports})
    for report in reports:
        report.metrics = summary["per_category"][report.name]
    return Report(str(run), str(root), method, summary, reports, [str(e) for e in errors])


def build_report(
    run: str | Path,
    data_root: str | Path,
    out: str | Path,
    *,
    categories: Sequence[str] | None = None,
    options: ReportOptions | None = None,
    cache_dir: str | None = None,
    format: str | None = None,
    device: str | None = None,
    progress: bool = False,
    log: Log = quiet,
) -> Path:
    """Write ``out/index.html``, a single self-contained page (see :mod:`mmiad.report.html`)."""
    report = collect_report(
        run,
        data_root,
        categories=categories,
        options=options,
        cache_dir=cache_dir,
        format=format,
        device=device,
        progress=progress,
        log=log,
    )
    target = Path(out) / "index.html"
    target.parent.mkdir(parents=True, exist_ok=True)
    write_text(target, render_report(report))
    return target
