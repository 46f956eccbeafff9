"""Keep a production line running when one sensor drops out.

Every trained model carries two small single-modality PatchCore models fitted on the same nominal features: one
on the 2D features, one on the 3D features. When a sample arrives without a usable point cloud (or without its
RGB image), the engine scores it with the model of the modality that is present and flags the prediction as
``degraded``, instead of stopping. Cross-modal defects are invisible to a single modality, so a degraded verdict
can miss them; BENCHMARKS.md compares the fallbacks with the full model on the synthetic data.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mmiad.data.errors import DataError
from mmiad.data.formats import get_format
from mmiad.data.io import valid_points
from mmiad.data.preprocess import prepare_input, preprocess_sample
from mmiad.data.preprocess.cache import needs_preprocessing
from mmiad.data.sample import Sample, SampleRecord
from mmiad.features.base import PointFeatures
from mmiad.features.pipeline import FeaturePipeline, SampleFeatures
from mmiad.methods.memorybank import MemoryBank
from mmiad.methods.memorybank.maps import patch_map
from mmiad.methods.prediction import Prediction

MODALITIES = ("2d", "3d")


class ModalityFallback:
    """Two single-modality nearest-neighbour models on a coarse patch grid.

    Args:
        grid: Patch grid side (28, as BTF).
        fraction: Coreset fraction of each bank.
        seed: Coreset projection seed.
        smoothing: Map smoothing (``gaussian`` σ=4 as the methods' default).
    """

    def __init__(self, grid: int = 28, fraction: float = 0.1, seed: int = 0, smoothing: str = "gaussian") -> None:
        self.grid, self.fraction, self.seed, self.smoothing = grid, fraction, seed, smoothing
        self.banks = {m: MemoryBank(fraction=fraction, seed=seed) for m in MODALITIES}

    def _image_rows(self, image: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(image.float().unsqueeze(0), self.grid)[0]
        return pooled.flatten(1).T

    def _point_rows(self, points: PointFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        return points.to_grid(self.grid).flatten(1).T, points.foreground(self.grid).flatten()

    def fit(self, features: Iterable[SampleFeatures]) -> ModalityFallback:
        """Collect nominal patches of both modalities and keep a coreset of each."""
        for sample in features:
            self.banks["2d"].add(self._image_rows(sample.image))
            rows, foreground = self._point_rows(sample.points)
            self.banks["3d"].add(rows[foreground])
        for bank in self.banks.values():
            bank.finalize()
        return self

    def score_image(self, image: torch.Tensor, out_size: int) -> tuple[torch.Tensor, float]:
        """(S×S map, image score) from 2D features alone."""
        distances, _ = self.banks["2d"].score(self._image_rows(image))
        anomaly_map = patch_map(distances, self.grid, out_size, smoothing=self.smoothing, sigma=4.0)
        return anomaly_map, float(anomaly_map.max())

    def score_points(self, points: PointFeatures, out_size: int) -> tuple[torch.Tensor, float]:
        """(S×S map, image score) from 3D features alone; background patches score zero."""
        rows, foreground = self._point_rows(points)
        distances = torch.zeros(rows.shape[0])
        if foreground.any():
            distances[foreground], _ = self.banks["3d"].score(rows[foreground])
        anomaly_map = patch_map(distances, self.grid, out_size, smoothing=self.smoothing, sigma=4.0)
        return anomaly_map, float(anomaly_map.max())

    def config(self) -> dict[str, Any]:
        """Settings and bank statistics for the model file."""
        return {
            "grid": self.grid,
            "fraction": self.fraction,
            "seed": self.seed,
            "smoothing": self.smoothing,
            "stats": {m: [self.banks[m].mean, self.banks[m].std] for m in MODALITIES},
        }

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The two banks, under ``fallback.<modality>``."""
        return {f"fallback.{m}": bank.bank for m, bank in self.banks.items() if bank.bank is not None}

    @classmethod
    def from_state(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> ModalityFallback:
        """Inverse of :meth:`config` + :meth:`state_tensors`."""
        fallback = cls(config["grid"], config["fraction"], config["seed"], config["smoothing"])
        for modality in MODALITIES:
            mean, std = config["stats"][modality]
            fallback.banks[modality].load(tensors[f"fallback.{modality}"], mean, std)
        return fallback


def missing_modality(record: SampleRecord) -> str | None:
    """``"3d"`` when the point cloud is unreadable or empty, ``"2d"`` when the RGB is unreadable, else None.

    Raises:
        DataError: when neither modality is usable (nothing to score).
    """
    return next(iter(modality_problems(record)), None)


def modality_problems(record: SampleRecord) -> dict[str, DataError]:
    """What makes a modality unusable (``{"3d": error}``), empty when both are usable (reading both files; the
    engine's loop learns it from its one read instead, see :func:`mmiad.engine.reading.read_record`).

    Raises:
        DataError: when neither modality is usable (nothing to score).
    """
    reader = get_format(record.format)
    problems: dict[str, DataError] = {}
    try:
        reader.read_rgb(record)
    except DataError as error:
        problems["2d"] = error
    try:
        if not valid_points(reader.read_xyz(record)).any():
            problems["3d"] = DataError(record.xyz_path, "the point cloud has no valid point")
    except DataError as error:
        problems["3d"] = error
    if len(problems) == 2:
        raise DataError(
            record.rgb_path, f"neither modality is usable ({problems['2d'].problem}; {problems['3d'].problem})"
        )
    return problems


def predict_degraded(
    pipeline: FeaturePipeline, fallback: ModalityFallback, record: SampleRecord, missing: str
) -> Prediction:
    """Score a sample as if ``missing`` had dropped out (reading its files); the prediction is flagged ``degraded``.

    The engine does not score through here: its scoring loop reads each file once and hands a degraded sample's
    one modality to :meth:`ModalityFallback.score_image` / :meth:`~ModalityFallback.score_points` itself. This is
    for measuring a fallback on whole samples (``python -m mmiad.bench fallback``).
    """
    reader = get_format(record.format)
    if missing == "3d":
        rgb = reader.read_rgb(record)
        xyz = np.zeros((*rgb.shape[:2], 3), np.float32)
    else:
        xyz = reader.read_xyz(record)
        rgb = np.zeros((*xyz.shape[:2], 3), np.uint8)
    gt_mask = reader.read_mask(record)
    if gt_mask is None and record.label == 0:
        gt_mask = np.zeros(rgb.shape[:2], bool)
    sample = Sample(rgb, xyz, valid_points(xyz), gt_mask, record.label, record.category, record.defect_type, record)
    if missing == "2d" and needs_preprocessing(record, pipeline.profile):
        sample = preprocess_sample(sample, pipeline.profile)
    inputs = prepare_input(sample, size=pipeline.image_size, rgb_pad_mode=pipeline.profile.rgb_pad_mode)
    # The pipeline's own entry points: on its device and in its precision, with the features back on the CPU.
    with torch.inference_mode():
        if missing == "3d":
            image = pipeline.image_features(inputs.rgb.unsqueeze(0))[0]
            anomaly_map, score = fallback.score_image(image, pipeline.image_size)
        else:
            points = pipeline.point_features(inputs.xyz, inputs.valid)
            anomaly_map, score = fallback.score_points(points, pipeline.image_size)
    present = "2d" if missing == "3d" else "3d"
    return Prediction(
        record=record,
        pred_score=score,
        anomaly_map=anomaly_map.numpy(),
        label=record.label,
        gt_mask=inputs.gt_mask,
        geometry=inputs,
        modality_maps={f"{present}_only": anomaly_map.numpy()},
        degraded=True,
        modality=present,
    )
