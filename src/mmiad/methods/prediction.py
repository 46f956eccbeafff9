"""What a scored sample is: the method's :class:`Scored` and the engine's :class:`Prediction`, with the finite checks.

A module of its own (re-exported by :mod:`mmiad.methods.base`) so that the engine's scoring loop, the fallback and
the methods share these types without importing one another in a circle.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mmiad.data.errors import DataError
from mmiad.data.sample import SampleRecord
from mmiad.postprocess.threshold import Thresholds


@dataclass
class Prediction:
    """The output for one sample, at the model's square input resolution.

    Attributes:
        record: The sample it belongs to.
        pred_score: Image-level anomaly score (higher is more anomalous).
        anomaly_map: S×S final anomaly map.
        label: Ground-truth label (-1 when unknown).
        gt_mask: S×S ground truth resized like the model input, or None.
        geometry: How the square input maps back to the original image (see ``map_to_original``).
        modality_maps: Intermediate maps by name (e.g. ``2d``, ``3d``), for reports.
        metric_maps: Per-metric maps where the official code normalises differently per metric (``compat``).
        pred_label: 1 when ``pred_score`` exceeds the calibrated threshold, else 0 (None without thresholds).
        pred_mask: S×S bool mask of pixels above the calibrated pixel threshold (None without thresholds).
        degraded: True when a modality was missing and the score comes from a fallback.
        model: Which model of the run produced it (its key: a category or ``unified``; the export folder for
            ONNX), None when a model was called directly.
        modality: What it was scored from: ``2d+3d`` (the method), ``2d`` or ``3d`` (the fallback, degraded).
        thresholds: The thresholds that gave ``pred_label``/``pred_mask`` (the fallback's for degraded samples,
            the user's image threshold when overridden), None when none applied.
        note: Why the prediction is degraded or has no label, for the summary table ("" when neither).
        cached_record: The preprocessed copy the model read, when ``record`` is the user's own files.
    """

    record: SampleRecord
    pred_score: float
    anomaly_map: np.ndarray
    label: int
    gt_mask: np.ndarray | None
    geometry: Any
    modality_maps: dict[str, np.ndarray] = field(default_factory=dict)
    metric_maps: dict[str, np.ndarray] = field(default_factory=dict)
    pred_label: int | None = None
    pred_mask: np.ndarray | None = None
    degraded: bool = False
    model: str | None = None
    modality: str = "2d+3d"
    thresholds: Thresholds | None = None
    note: str = ""
    cached_record: SampleRecord | None = None

    def map_for(self, metric: str) -> np.ndarray:
        """The map a metric should read: its own in ``compat`` runs, otherwise the final map."""
        return self.metric_maps.get(metric, self.anomaly_map)


def with_source(prediction: Prediction, source: SampleRecord) -> Prediction:
    """The prediction with ``record`` set to the user's record (``source``) and the cached copy kept aside.

    Methods read preprocessed copies from the cache; what a user looks up in ``predictions.csv`` is their own file.
    """
    if prediction.record != source:
        prediction.cached_record = prediction.record
        prediction.record = source
    return prediction


def check_finite(prediction: Prediction) -> None:
    """Fail closed on a non-finite score or map: a NaN compares false with every threshold, so it would be "good".

    Raises:
        DataError: naming the sample's files; the caller reports it and carries on with the rest of the batch.
    """
    score = float(prediction.pred_score)
    bad_pixels = int(np.count_nonzero(~np.isfinite(np.asarray(prediction.anomaly_map, dtype=np.float64))))
    if np.isfinite(score) and not bad_pixels:
        return
    record = prediction.record
    what = f"anomaly score {score}" if not np.isfinite(score) else f"{bad_pixels} non-finite anomaly map value(s)"
    raise DataError(record.rgb_path, f"{what} (xyz {record.xyz_path}); the sample is not labelled")


def finite_only(predictions: Iterable[Prediction], errors: list[DataError] | None) -> Iterator[Prediction]:
    """The predictions with a finite score and map; each other one is appended to ``errors`` (or raised)."""
    for prediction in predictions:
        try:
            check_finite(prediction)
        except DataError as error:
            if errors is None:
                raise
            errors.append(error)
            continue
        yield prediction


@dataclass
class Scored:
    """What a method computes for one sample from its features (:meth:`AnomalyModel.score`).

    The engine turns it into a :class:`Prediction` (record, label, ground truth, geometry, thresholds); a method
    only says how anomalous the sample looks.

    Attributes:
        score: Image-level anomaly score (higher is more anomalous).
        anomaly_map: S×S final map at the model input side (``image_size``), float32 on the CPU.
        modality_maps: Intermediate maps by name (``2d``, ``3d``...), for reports.
        metric_maps: Per-metric maps where the official code normalises differently per metric (``compat``).
    """

    score: float
    anomaly_map: np.ndarray
    modality_maps: dict[str, np.ndarray] = field(default_factory=dict)
    metric_maps: dict[str, np.ndarray] = field(default_factory=dict)
