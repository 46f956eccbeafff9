"""What ``predict`` leaves on disk for a line engineer: maps, overlays, masks and a summary table."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmiad.data.errors import DataError
from mmiad.data.formats import get_format
from mmiad.data.io import write_map, write_mask, write_rgb
from mmiad.data.preprocess import map_to_original
from mmiad.methods.base import Prediction
from mmiad.utils.atomic import write_json, write_text
from mmiad.utils.names import plain_name

# Anchor colours of a perceptually ordered blue → cyan → yellow → red ramp.
_RAMP = np.array([[0, 0, 128], [0, 128, 255], [0, 255, 255], [255, 255, 0], [255, 128, 0], [200, 0, 0]], np.float32)


def colorize(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to an RGB heat ramp (uint8)."""
    positions = np.clip(values, 0.0, 1.0) * (len(_RAMP) - 1)
    low = np.floor(positions).astype(int).clip(0, len(_RAMP) - 2)
    frac = (positions - low)[..., None]
    return (_RAMP[low] * (1 - frac) + _RAMP[low + 1] * frac).astype(np.uint8)


def overlay(rgb: np.ndarray, anomaly_map: np.ndarray, scale: float, alpha: float = 0.5) -> np.ndarray:
    """Blend a heat map over the image; ``scale`` maps to full red (2× the pixel threshold by default)."""
    heat = colorize(anomaly_map / max(scale, 1e-12)).astype(np.float32)
    weight = alpha * np.clip(anomaly_map / max(scale, 1e-12), 0.0, 1.0)[..., None]
    return (rgb.astype(np.float32) * (1 - weight) + heat * weight).astype(np.uint8)


@dataclass
class PredictionRow:
    """One line of the summary table."""

    name: str
    rgb_path: str
    xyz_path: str
    score: float
    label: int | None
    threshold: float | None
    degraded: bool
    map_path: str
    model: str | None = None
    modality: str = "2d+3d"
    note: str = ""
    xyz_cache_path: str = ""

    def as_dict(self) -> dict[str, object]:
        """JSON/CSV-ready fields."""
        return dict(self.__dict__)


def write_prediction(prediction: Prediction, out: Path) -> PredictionRow:
    """Map (float TIFF, input resolution), overlay PNG and, with thresholds, the binary mask PNG.

    The overlay scale and mask use the thresholds that labelled the prediction (``prediction.thresholds``).
    """
    thresholds = prediction.thresholds
    record = prediction.record
    name = plain_name(record.stem, source=record.rgb_path)
    full_map = map_to_original(prediction.anomaly_map, prediction.geometry)
    map_path = out / "maps" / f"{name}.tiff"
    write_map(map_path, full_map)
    scale = 2 * thresholds.pixel if thresholds is not None and thresholds.pixel > 0 else float(full_map.max() or 1)
    rgb = _input_rgb(prediction)
    write_rgb(out / "overlays" / f"{name}.png", overlay(rgb, full_map, scale))
    if thresholds is not None:
        write_mask(out / "masks" / f"{name}.png", full_map > thresholds.pixel)
    note = prediction.note
    if prediction.pred_label is None and not note:
        note = "not labelled: no calibrated threshold"
    cached = prediction.cached_record
    return PredictionRow(
        name=name,
        rgb_path=str(record.rgb_path),
        xyz_path=str(record.xyz_path),
        score=float(prediction.pred_score),
        label=prediction.pred_label,
        threshold=thresholds.image if thresholds is not None else None,
        degraded=prediction.degraded,
        map_path=str(map_path),
        model=prediction.model,
        modality=prediction.modality,
        note=note,
        xyz_cache_path=str(cached.xyz_path) if cached is not None else "",
    )


def _input_rgb(prediction: Prediction) -> np.ndarray:
    """The sample's RGB at its original resolution (black when unreadable: a degraded 3D-only sample)."""
    record = prediction.record
    kept = getattr(prediction.geometry, "source_rgb", None)
    if kept is not None:  # read once by the scoring loop already
        return np.asarray(kept)
    try:
        return get_format(record.format).read_rgb(record)
    except DataError:
        height, width = map_to_original(prediction.anomaly_map, prediction.geometry).shape
        return np.zeros((height, width, 3), np.uint8)


def write_predictions(
    predictions: Iterable[Prediction],
    out: Path,
    *,
    on_row: Callable[[PredictionRow], None] | None = None,
    errors: list[DataError] | None = None,
) -> tuple[list[PredictionRow], Path]:
    """Write every prediction (see :func:`write_prediction`), then ``predictions.csv``/``.json``.

    The summary is written even when scoring stops on an error part-way, so what was written is listed. With
    ``errors``, a sample whose outputs cannot be written (e.g. a stem that is not a plain name) is reported there
    and the others are still written.

    Returns:
        The rows and the CSV path.
    """
    rows: list[PredictionRow] = []
    try:
        for prediction in predictions:
            try:
                rows.append(write_prediction(prediction, out))
            except DataError as error:
                if errors is None:
                    raise
                errors.append(error)
                continue
            if on_row is not None:
                on_row(rows[-1])
    finally:
        csv_path, _ = write_summary(rows, out)
    return rows, csv_path


def write_summary(rows: Sequence[PredictionRow], out: Path) -> tuple[Path, Path]:
    """``predictions.csv`` and ``predictions.json`` with one row per sample."""
    csv_path, json_path = out / "predictions.csv", out / "predictions.json"
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=list(PredictionRow.__dataclass_fields__))
    writer.writeheader()
    writer.writerows(row.as_dict() for row in rows)
    write_text(csv_path, table.getvalue())
    write_json(json_path, [row.as_dict() for row in rows])
    return csv_path, json_path
