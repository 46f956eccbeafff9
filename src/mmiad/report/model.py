"""What a report holds, independent of how it is collected (:mod:`.build`) or drawn (:mod:`.html`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mmiad.postprocess.threshold import Thresholds
from mmiad.report.images import Cloud


@dataclass
class SampleView:
    """One gallery card: who the sample is, how it scored and its pictures (title → PNG data URI)."""

    name: str
    defect_type: str
    label: int
    score: float
    verdict: str
    pictures: dict[str, str]
    captions: dict[str, str] = field(default_factory=dict)
    cloud: Cloud | None = None


@dataclass
class CategoryReport:
    """Everything the page shows about one category."""

    name: str
    metrics: dict[str, float | None]
    roc: tuple[np.ndarray, np.ndarray] | None
    pro: tuple[np.ndarray, np.ndarray] | None
    gallery: list[SampleView]
    thresholds: Thresholds | None
    counts: dict[str, int]


@dataclass
class Report:
    """A whole run's report, ready to render."""

    run: str
    data_root: str
    method: str
    summary: dict[str, Any]
    categories: list[CategoryReport]
    skipped: list[str]
