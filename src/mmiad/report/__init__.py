"""A self-contained HTML report of a trained run: metrics, ROC/PRO curves, worst samples and a 3D view."""

from __future__ import annotations

from mmiad.report.build import ReportOptions, build_report, collect_report
from mmiad.report.model import CategoryReport, Report, SampleView

__all__ = ["CategoryReport", "Report", "ReportOptions", "SampleView", "build_report", "collect_report"]
