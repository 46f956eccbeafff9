"""BTF: "Back to the Feature" (Horwitz & Hoshen, 2022), RGB + FPFH patch features in a PatchCore memory bank.

Each 28×28 patch is described by its RGB feature (Wide-ResNet-50-2 layers 2+3 in the paper, the weight-free
texture extractor by default here) concatenated, unscaled, with the FPFH of the points projected onto it. A
greedy coreset of 10% of the nominal patches is kept; a test patch scores its distance to the nearest kept patch,
and the image score is PatchCore's reweighted maximum. No training beyond collecting features.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from mmiad.data.errors import DataError
from mmiad.data.sample import SampleRecord
from mmiad.features.pipeline import FeaturePipeline, SampleFeatures
from mmiad.methods.base import AnomalyModel, Prediction, register_method
from mmiad.methods.memorybank.maps import patch_map
from mmiad.methods.memorybank.settings import BankSettings
from mmiad.methods.modelfile import ModelFileError
from mmiad.postprocess.smoothing import SMOOTHINGS


@dataclass
class BTFConfig(BankSettings):
    """BTF hyperparameters (paper defaults; ``compat`` switches to the official code's blur).

    The memory-bank fields (coreset fraction and ε, seed, reweighting k, kNN backend, device, memory budget) are
    :class:`~mmiad.methods.memorybank.settings.BankSettings`'.

    Attributes:
        extractors: Extractor preset; ``weightfree`` (texture + FPFH) or ``wrn50-fpfh`` (the paper's backbone).
        profile: Preprocessing profile; ``none`` is BTF's main setting (raw data), ``m3dm`` its preprocessed one.
        image_size: Model input side (224 in the paper).
        grid_size: Patch grid side (28 in the paper).
        smoothing: ``gaussian`` (paper, σ=4) or ``pil_uint8`` (official PIL blur of a uint8 copy).
        sigma: Blur σ (PIL radius for ``pil_uint8``).
        compat: Official behaviour: ``pil_uint8`` smoothing.
        weights_dir: Folder with pretrained checkpoints (deep presets).
        random_init: Allow random extractor weights (tests, smoke runs).
    """

    extractors: str = "weightfree"
    profile: str = "none"
    image_size: int = 224
    grid_size: int = 28
    smoothing: str = "gaussian"
    sigma: float = 4.0
    compat: bool = False
    weights_dir: str | None = None
    random_init: bool = False

    def __post_init__(self) -> None:
        if self.compat and self.smoothing == "gaussian":
            self.smoothing = "pil_uint8"
        if self.smoothing not in SMOOTHINGS:
            raise ValueError(f"unknown smoothing {self.smoothing!r}; expected one of {SMOOTHINGS}")
        self.check_bank_settings()
        if self.grid_size < 1:
            raise ValueError(f"grid_size must be at least 1, got {self.grid_size}")


def btf_patches(features: SampleFeatures, grid: int) -> torch.Tensor:
    """grid²×(C_rgb + C_3d) rows: the RGB map pooled to the grid and the projected point features, unscaled."""
    rgb = F.adaptive_avg_pool2d(features.image.float().unsqueeze(0), grid)[0]
    points = features.points.to_grid(grid).float()
    return torch.cat([rgb, points], dim=0).flatten(1).T.contiguous()


@register_method("btf")
class BTF(AnomalyModel):
    """RGB + FPFH PatchCore; see :class:`BTFConfig`. Learned state: ``bank_`` (the coreset)."""

    def __init__(self, config: BTFConfig | None = None, *, cache_dir: str | None = None, **hparams: Any) -> None:
        self.config = config or BTFConfig(**hparams)
        self.cache_dir = cache_dir
        self._pipeline: FeaturePipeline | None = None

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

    def predict(
        self, records: Sequence[SampleRecord], *, progress: bool = False, errors: list[DataError] | None = None
    ) -> Iterator[Prediction]:
        """Nearest-patch distance map (blurred) and reweighted image score per sample."""
        self.check_fitted()
        config = self.config
        prepared = self.pipeline.preprocess(records, progress=False, errors=errors)
        for record, features in self.pipeline.iter_features(
            prepared, progress=progress, errors=errors, description="predict btf"
        ):
            distances, score = self.bank_.score(btf_patches(features, config.grid_size), reweight_k=config.reweight_k)
            anomaly_map = patch_map(
                distances, config.grid_size, config.image_size, smoothing=config.smoothing, sigma=config.sigma
            )
            inputs = features.inputs
            yield Prediction(
                record=record,
                pred_score=score,
                anomaly_map=anomaly_map.numpy(),
                label=inputs.label,
                gt_mask=inputs.gt_mask,
                geometry=inputs,
                modality_maps={"patch": distances.view(config.grid_size, config.grid_size).numpy()},
            )

    def get_config(self) -> dict[str, Any]:
        """Hyperparameters, extractor configuration and the bank size."""
        config: dict[str, Any] = {"method": self.name, "hparams": asdict(self.config)}
        if getattr(self, "fitted_", False):
            config["pipeline"] = self.pipeline.config()
            config["n_train_samples"] = self.n_train_samples_
            config["banks"] = {"patch": {"rows": len(self.bank_), "collected": self.n_collected_}}
            config["feature_dim"] = int(self.bank_.search.bank.shape[1])
        return config

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The coreset bank (no normalisation in BTF)."""
        self.check_fitted()
        assert self.bank_.bank is not None
        return {"bank.patch": self.bank_.bank}

    @classmethod
    def from_state(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor], **overrides: Any) -> BTF:
        """Rebuild a fitted BTF; fails clearly when the configured extractors differ from training's."""
        hparams = {**config["hparams"], **{k: v for k, v in overrides.items() if k != "cache_dir"}}
        model = cls(BTFConfig(**hparams), cache_dir=overrides.get("cache_dir"))
        model.check_pipeline(config.get("pipeline"))
        if "bank.patch" not in tensors:
            raise ModelFileError("BTF model file without a 'bank.patch' tensor")
        model.bank_ = model.config.new_bank(model.cache_dir)
        model.bank_.load(tensors["bank.patch"], 0.0, 1.0)
        model.n_train_samples_ = int(config.get("n_train_samples", 0))
        model.n_collected_ = int(config.get("banks", {}).get("patch", {}).get("collected", 0))
        model.fitted_ = True
        return model
