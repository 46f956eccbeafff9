"""BTF: "Back to the Feature" (Horwitz & Hoshen, 2022), RGB + FPFH patch features in a PatchCore memory bank.

Each 28×28 patch is described by its RGB feature (Wide-ResNet-50-2 layers 2+3 in the paper, the weight-free
texture extractor by default here) concatenated, unscaled, with the FPFH of the points projected onto it. A
greedy coreset of 10% of the nominal patches is kept; a test patch scores its distance to the nearest kept patch,
and the image score is PatchCore's reweighted maximum. No training beyond collecting features.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from mmiad.data.errors import DataError
from mmiad.data.sample import SampleRecord
from mmiad.features.pipeline import SampleFeatures
from mmiad.methods.base import AnomalyModel, Scored
from mmiad.methods.hparams import require
from mmiad.methods.memorybank.maps import patch_map
from mmiad.methods.memorybank.settings import BankSettings
from mmiad.methods.modelfile import ModelFileError
from mmiad.methods.registry import register_method
from mmiad.postprocess.smoothing import SMOOTHINGS


@dataclass
class BTFConfig(BankSettings):
    """BTF hyperparameters (raw data as the official README's best numbers, the paper's σ=4 Gaussian; ``compat``
    switches to the official code's blur).

    The pipeline fields are :class:`~mmiad.methods.settings.MethodSettings`' (extractors: ``weightfree``, or
    ``wrn50-fpfh`` for the paper's backbone); the memory-bank fields (coreset fraction and ε, seed, reweighting k,
    kNN backend, memory budget) are :class:`~mmiad.methods.memorybank.settings.BankSettings`'.

    Attributes:
        profile: Preprocessing profile; ``none`` is BTF's main setting (raw data), ``m3dm`` its preprocessed one.
        grid_size: Patch grid side (28 in the paper).
        smoothing: ``gaussian`` (paper, σ=4) or ``pil_uint8`` (official PIL blur of a uint8 copy; the default
            under ``compat``).
        sigma: Blur σ (PIL radius for ``pil_uint8``).
    """

    profile: str = "none"
    grid_size: int = 28
    smoothing: str = "gaussian"
    sigma: float = 4.0

    inference_keys = BankSettings.inference_keys | {"smoothing", "sigma", "reweight_k"}
    paper_extractors = "wrn50-fpfh"

    def compat_values(self) -> dict[str, Any]:
        """The official code blurs a uint8 copy of the map with PIL."""
        return {"smoothing": "pil_uint8"}

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.smoothing in SMOOTHINGS, "smoothing", self.smoothing, f"expected one of {', '.join(SMOOTHINGS)}")
        self.check_bank_settings()
        require(self.grid_size >= 1, "grid_size", self.grid_size, "must be at least 1")
        require(self.sigma >= 0, "sigma", self.sigma, "must be at least 0")


def btf_patches(features: SampleFeatures, grid: int) -> torch.Tensor:
    """grid²×(C_rgb + C_3d) rows: the RGB map pooled to the grid and the projected point features, unscaled."""
    rgb = F.adaptive_avg_pool2d(features.image.float().unsqueeze(0), grid)[0]
    points = features.points.to_grid(grid).float()
    return torch.cat([rgb, points], dim=0).flatten(1).T.contiguous()


@register_method("btf")
class BTF(AnomalyModel):
    """Back to the Feature: RGB + FPFH patches in one PatchCore bank (Horwitz & Hoshen, CVPR 2023).

    See :class:`BTFConfig`. Learned state: ``bank_`` (the coreset).
    """

    config_class = BTFConfig
    config: BTFConfig
    tiny_hparams: ClassVar[dict[str, Any]] = {"image_size": 64, "grid_size": 8}

    def fit(
        self, records: Sequence[SampleRecord], *, progress: bool = False, errors: list[DataError] | None = None
    ) -> BTF:
        """Collect every nominal patch, then keep the greedy coreset."""
        if not records:
            raise ValueError("BTF.fit needs at least one nominal training sample")
        prepared = self.pipeline.preprocess(records, progress=progress, errors=errors)
        bank = self.config.new_bank(self.cache_dir)
        used = 0
        for _, features in self.pipeline.iter_features(prepared, progress=progress, errors=errors):
            bank.add(btf_patches(features, self.config.grid_size))
            used += 1
        if used == 0:
            raise ValueError("no usable training sample (all were reported as bad)")
        bank.finalize(progress=progress)
        self.bank_ = bank
        self.n_train_samples_ = used
        self.n_collected_ = bank.collected
        self.fitted_ = True
        return self

    def score(self, features: Sequence[SampleFeatures]) -> list[Scored]:
        """Nearest-patch distance map (blurred) and reweighted image score per sample."""
        config = self.settings
        results = []
        for sample in features:
            distances, score = self.bank_.score(btf_patches(sample, config.grid_size), reweight_k=config.reweight_k)
            anomaly_map = patch_map(
                distances, config.grid_size, config.image_size, smoothing=config.smoothing, sigma=config.sigma
            )
            results.append(
                Scored(
                    score=score,
                    anomaly_map=anomaly_map.numpy(),
                    modality_maps={"patch": distances.view(config.grid_size, config.grid_size).numpy()},
                )
            )
        return results

    def learned_facts(self) -> dict[str, Any]:
        """The bank size and row width."""
        return {
            "n_train_samples": self.n_train_samples_,
            "banks": {"patch": {"rows": len(self.bank_), "collected": self.n_collected_}},
            "feature_dim": int(self.bank_.search.bank.shape[1]),
        }

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The coreset bank (no normalisation in BTF)."""
        self.check_fitted()
        assert self.bank_.bank is not None
        return {"bank.patch": self.bank_.bank}

    def load_state(self, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """The coreset bank."""
        if "bank.patch" not in tensors:
            raise ModelFileError("BTF model file without a 'bank.patch' tensor")
        self.bank_ = self.config.new_bank(self.cache_dir)
        self.bank_.load(tensors["bank.patch"], 0.0, 1.0)
        self.n_train_samples_ = int(config.get("n_train_samples", 0))
        self.n_collected_ = int(config.get("banks", {}).get("patch", {}).get("collected", 0))
