"""Scoring a folder of anomaly maps against a dataset: the ``mmiad evaluate`` contract.

Maps come from any tool, not only mmiad, so the layout mirrors the dataset and the official MVTec 3D-AD
evaluation: ``<maps_dir>/<category>/test/<defect>/<stem>.tiff``, a float32 map at the ground truth's resolution.
A tool whose image score is not the map's maximum (e.g. a top-k mean) writes ``<stem>.json`` with
``{"score": s}`` next to the map. A broken or missing file is reported and that sample skipped, so one bad file
costs one sample, not the run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from mmiad.data.errors import DataError
from mmiad.data.formats import get_format, open_dataset
from mmiad.data.io import read_map
from mmiad.data.sample import LABEL_ANOMALOUS, SampleRecord
from mmiad.metrics.pro import AuproMode
from mmiad.metrics.report import METRIC_KEYS, category_metrics, summarize


def map_path(maps_dir: str | Path, record: SampleRecord) -> Path:
    """Where the anomaly map of a test record is expected."""
    return Path(maps_dir) / record.category / "test" / record.defect_type / f"{record.stem}.tiff"


def _image_size(rgb_path: Path) -> tuple[int, int]:
    """(height, width) of an image from its header only: a good sample has no GT file to take the size from."""
    try:
        with Image.open(rgb_path) as image:
            width, height = image.size
    except FileNotFoundError as error:
        raise DataError(rgb_path, "file not found") from error
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise DataError(rgb_path, f"unreadable image header ({error})") from error
    return height, width


def _score_override(json_path: Path) -> float | None:
    """The image score from ``<stem>.json`` when present, else None (the map's maximum is used)."""
    if not json_path.is_file():
        return None
    try:
        content = json.loads(json_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(json_path, f"unreadable score file ({error})") from error
    score = content.get("score") if isinstance(content, dict) else None
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        raise DataError(json_path, f'expected {{"score": <finite number>}}, got {content!r}')
    return float(score)


def _load_pair(maps_dir: Path, record: SampleRecord) -> tuple[np.ndarray, np.ndarray, float]:
    """The (GT mask, map, image score) of one record; DataError for anything missing or inconsistent."""
    path = map_path(maps_dir, record)
    anomaly_map = read_map(path)
    mask = get_format(record.format).read_mask(record)
    gt = mask if mask is not None else np.zeros(_image_size(record.rgb_path), bool)
    if anomaly_map.shape != gt.shape:
        raise DataError(
            path,
            f"map size {anomaly_map.shape[1]}×{anomaly_map.shape[0]} differs from the ground truth "
            f"{gt.shape[1]}×{gt.shape[0]}; maps must be written at the original resolution",
        )
    if not np.isfinite(anomaly_map).all():
        raise DataError(path, "anomaly map contains NaN or infinite values")
    override = _score_override(path.with_suffix(".json"))
    score = float(anomaly_map.max()) if override is None else override
    return gt, anomaly_map, score


def evaluate_maps_dir(
    data_root: str | Path,
    maps_dir: str | Path,
    *,
    categories: Sequence[str] | None = None,
    aupro_mode: AuproMode = "exact",
    num_thresholds: int = 99,
    format: str | None = None,
    progress: bool = False,
) -> tuple[dict[str, Any], list[DataError]]:
    """Evaluate anomaly maps written in the MVTec 3D-AD layout against the dataset's test ground truth.

    Args:
        data_root: Dataset root, in any registered format (detected unless ``format`` is given).
        maps_dir: Root of the maps, ``<maps_dir>/<category>/test/<defect>/<stem>.tiff`` (+ optional ``.json``).
        categories: Categories to evaluate; all categories of ``data_root`` by default.
        aupro_mode: ``"exact"`` (official MVTec evaluation) or ``"compat"`` (BTF/M3DM/CFM).
        num_thresholds: Sampled thresholds in compat mode.
        format: Dataset format name (:mod:`mmiad.data.formats`).
        progress: Show a tqdm progress bar per category.

    Returns:
        The :func:`~mmiad.metrics.report.summarize` result and every problem met (missing or unreadable maps,
        size mismatches, unpaired dataset files); each problem skipped one sample, or a whole category when it
        could not be read at all.

    Raises:
        DataError: when ``data_root`` or ``maps_dir`` does not exist.
    """
    maps_dir = Path(maps_dir)
    if not maps_dir.is_dir():
        raise DataError(maps_dir, "anomaly map folder not found")
    dataset = open_dataset(data_root, format)
    errors: list[DataError] = []
    per_category: dict[str, dict[str, float]] = {}
    for category in dataset.categories() if categories is None else categories:
        try:
            records = dataset.records(category, "test", errors=errors)
        except DataError as error:
            errors.append(error)
            continue
        labels: list[int] = []
        scores: list[float] = []
        masks: list[np.ndarray] = []
        maps: list[np.ndarray] = []
        for record in tqdm(records, desc=category, unit="map", disable=not progress):
            if record.label == LABEL_ANOMALOUS and record.gt_path is None:
                continue  # list_records has already reported the missing mask
            try:
                gt, anomaly_map, score = _load_pair(maps_dir, record)
            except DataError as error:
                errors.append(error)
                continue
            labels.append(record.label)
            scores.append(score)
            masks.append(gt)
            maps.append(anomaly_map)
        if not maps:
            errors.append(DataError(maps_dir / category, "no test sample of this category could be evaluated"))
            per_category[category] = dict.fromkeys(METRIC_KEYS, math.nan)
            continue
        per_category[category] = category_metrics(
            labels, scores, masks, maps, aupro_mode=aupro_mode, num_thresholds=num_thresholds
        )
    return summarize(per_category), errors
