"""Benchmark metrics: I-AUROC, P-AUROC and AUPRO (exact official curve or the papers' sampled variant)."""

from __future__ import annotations

from mmiad.metrics.maps_dir import evaluate_maps_dir, map_path
from mmiad.metrics.pixels import PixelScores, UndefinedMetricError
from mmiad.metrics.pro import PAPER_AUPRO_THRESHOLDS, aupro, aupro_many, aupro_protocol, pro_curve, trapezoid_to
from mmiad.metrics.report import AUPRO_LIMITS, METRIC_KEYS, aupro_key, category_metrics, format_table, summarize
from mmiad.metrics.roc import image_auroc, pixel_auroc

__all__ = [
    "AUPRO_LIMITS",
    "METRIC_KEYS",
    "PAPER_AUPRO_THRESHOLDS",
    "PixelScores",
    "UndefinedMetricError",
    "aupro",
    "aupro_key",
    "aupro_many",
    "aupro_protocol",
    "category_metrics",
    "evaluate_maps_dir",
    "format_table",
    "image_auroc",
    "map_path",
    "pixel_auroc",
    "pro_curve",
    "summarize",
    "trapezoid_to",
]
