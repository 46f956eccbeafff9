"""M3DM: Multi-3D-Memory (Wang et al., CVPR 2023): three memory banks fused at the decision layer.

Point features are projected onto a 56×56 grid, RGB features sit on a 28×28 grid (pooled 2× to 56 for fusion),
and UFF fuses the two per patch. Three PatchCore banks (RGB, point, fused) each give a distance map and a
reweighted image score; decision-layer fusion (DLF) combines them with two linear one-class SVMs, one on the
3-vectors of image scores, one on the per-pixel 3-vectors of maps. Like the official code, the SVMs are fitted on
the *training* samples scored against banks built from those same samples.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mmiad.data.errors import DataError
from mmiad.data.sample import SampleRecord
from mmiad.features.pipeline import FeaturePipeline, SampleFeatures
from mmiad.methods.base import AnomalyModel, Prediction, register_method
from mmiad.methods.m3dm.fusion import FeatureFusionBlock, contrastive_backward, cosine_lr, official_training_rgb
from mmiad.methods.memorybank import MemoryBank
from mmiad.methods.memorybank.maps import patch_map
from mmiad.methods.memorybank.settings import BankSettings
from mmiad.methods.modelfile import ModelFileError, prefixed, split_prefixed
from mmiad.postprocess.smoothing import SMOOTHINGS

BANKS = ("point", "rgb", "fused")


@dataclass
class M3DMConfig(BankSettings):
    """M3DM hyperparameters (paper defaults; the official code's quirks behind ``compat``).

    The memory-bank fields (coreset fraction and ε, seed, reweighting k, kNN backend, device, memory budget per
    bank) are :class:`~mmiad.methods.memorybank.settings.BankSettings`'; ``seed`` also seeds UFF's initialisation
    and shuffling, and ``device`` is where UFF trains.

    Attributes:
        extractors: Extractor preset (``weightfree``; ``dino-pointmae`` is the paper's, with real weights).
        profile: Preprocessing profile (``m3dm``: plane removal, RGB background zeroed).
        image_size: Model input side (224).
        rgb_grid: RGB patch grid (28).
        point_grid: Point and fused patch grid (56).
        use_uff: Train and use UFF; without it the fused feature is the plain concatenation (users of the
            official code report UFF often hurts).
        epochs: UFF epochs (official default 3).
        batch_size: Images per UFF step (official 16).
        learning_rate: AdamW learning rate (README: 0.003).
        weight_decay: AdamW weight decay (intended 1.5e-6; the official code never passes it: 0.01 under compat).
        warmup_epochs: Linear warm-up before the cosine schedule (1).
        uff_max_patches: Cap on foreground patches per InfoNCE step (None = all; logits are N×N).
        lambdas: Weights of the (point, rgb, fused) scores and maps before DLF (official 1.0, 0.1, 1.0).
        ocsvm_nu: ``nu`` of both one-class SVMs (0.5).
        ocsvm_max_iter: Their ``max_iter`` (1000).
        smoothing: ``gaussian`` (σ=4) or ``pil_uint8`` (official PIL blur of a uint8 copy).
        sigma: Blur σ (PIL radius for ``pil_uint8``).
        compat: Official behaviour: PIL blur, mixed normalisation statistics, RGB and fused coresets sized from
            the point coreset, AdamW weight decay 0.01, UFF trained on the position-scrambled RGB rows of the
            official feature dump (:func:`~mmiad.methods.m3dm.fusion.official_training_rgb`).
        weights_dir: Folder with pretrained checkpoints (deep presets).
        random_init: Allow random extractor weights (tests, smoke runs).
    """

    extractors: str = "weightfree"
    profile: str = "m3dm"
    image_size: int = 224
    rgb_grid: int = 28
    point_grid: int = 56
    use_uff: bool = True
    epochs: int = 3
    batch_size: int = 16
    learning_rate: float = 0.003
    weight_decay: float = 1.5e-6
    warmup_epochs: int = 1
    uff_max_patches: int | None = None
    lambdas: tuple[float, float, float] = (1.0, 0.1, 1.0)
    ocsvm_nu: float = 0.5
    ocsvm_max_iter: int = 1000
    smoothing: str = "gaussian"
    sigma: float = 4.0
    compat: bool = False
    weights_dir: str | None = None
    random_init: bool = False

    def __post_init__(self) -> None:
        self.lambdas = tuple(float(v) for v in self.lambdas)  # type: ignore[assignment]
        if self.compat and self.smoothing == "gaussian":
            self.smoothing = "pil_uint8"
        if self.compat and self.weight_decay == 1.5e-6:
            self.weight_decay = 0.01
        if self.smoothing not in SMOOTHINGS:
            raise ValueError(f"unknown smoothing {self.smoothing!r}; expected one of {SMOOTHINGS}")
        if len(self.lambdas) != 3:
            raise ValueError(f"lambdas needs three weights (point, rgb, fused), got {self.lambdas}")
        self.check_bank_settings()
        if self.epochs < 0 or self.batch_size < 1:
            raise ValueError("need epochs >= 0 and batch_size >= 1")


@dataclass
class PatchSets:
    """One sample's patch rows: point (point_grid², fg mask), RGB (rgb_grid²) and RGB pooled to point_grid²."""

    point: torch.Tensor
    foreground: torch.Tensor
    rgb: torch.Tensor
    rgb_fine: torch.Tensor


def patch_sets(features: SampleFeatures, rgb_grid: int, point_grid: int) -> PatchSets:
    """The official alignment: point map via ``to_grid``, RGB adaptive-pooled to 28, then to 56 (a 2× repeat)."""
    rgb = F.adaptive_avg_pool2d(features.image.float().unsqueeze(0), rgb_grid)
    rgb_fine = F.adaptive_avg_pool2d(rgb, point_grid)[0]
    return PatchSets(
        point=features.points.to_grid(point_grid).float().flatten(1).T.contiguous(),
        foreground=features.points.foreground(point_grid).flatten(),
        rgb=rgb[0].flatten(1).T.contiguous(),
        rgb_fine=rgb_fine.flatten(1).T.contiguous(),
    )


@register_method("m3dm")
class M3DM(AnomalyModel):
    """Three memory banks + UFF + DLF; see :class:`M3DMConfig`.

    Learned state: ``uff_`` (None without UFF), ``banks_`` (point, rgb, fused), ``detect_coef_`` and
    ``segment_coef_`` (the linear OCSVM weights: ``score_samples(x) = x·coef``).
    """

    def __init__(self, config: M3DMConfig | None = None, *, cache_dir: str | None = None, **hparams: Any) -> None:
        self.config = config or M3DMConfig(**hparams)
        self.cache_dir = cache_dir
        self._pipeline: FeaturePipeline | None = None

    def _sets(self, features: SampleFeatures) -> PatchSets:
        return patch_sets(features, self.config.rgb_grid, self.config.point_grid)

    def fused(self, sets: PatchSets) -> torch.Tensor:
        """point_grid²×(C3 + C2) fused rows: UFF's MLP outputs, or the plain concatenation without UFF."""
        if self.uff_ is None:
            return torch.cat([sets.point, sets.rgb_fine], dim=1)
        with torch.no_grad():
            return self.uff_.fuse(sets.point, sets.rgb_fine)

    # ------------------------------------------------------------------ training
    def _train_uff(self, records: list[SampleRecord], first: PatchSets, progress: bool) -> None:
        config = self.config
        torch.manual_seed(config.seed)
        self.uff_ = FeatureFusionBlock(first.point.shape[1], first.rgb.shape[1])
        optimizer = torch.optim.AdamW(
            self.uff_.parameters(), lr=config.learning_rate, betas=(0.9, 0.95), weight_decay=config.weight_decay
        )
        generator = torch.Generator().manual_seed(config.seed)
        steps_per_epoch = -(-len(records) // config.batch_size)
        total, warmup = config.epochs * steps_per_epoch, config.warmup_epochs * steps_per_epoch
        self.loss_history_: list[float] = []
        step = 0
        for _ in tqdm(range(config.epochs), desc="train uff", disable=not progress, leave=False):
            order = torch.randperm(len(records), generator=generator).tolist()
            losses = []
            for start in range(0, len(order), config.batch_size):
                point_rows, rgb_rows = [], []
                for index in order[start : start + config.batch_size]:
                    sets = self._sets(self.pipeline.extract(records[index]))
                    point_rows.append(sets.point[sets.foreground])
                    rgb = official_training_rgb(sets.rgb, len(sets.point)) if config.compat else sets.rgb_fine
                    rgb_rows.append(rgb[sets.foreground])
                point, rgb = torch.cat(point_rows), torch.cat(rgb_rows)
                if config.uff_max_patches is not None and point.shape[0] > config.uff_max_patches:
                    keep = torch.randperm(point.shape[0], generator=generator)[: config.uff_max_patches]
                    point, rgb = point[keep], rgb[keep]
                if point.shape[0] < 2:
                    continue
                for group in optimizer.param_groups:
                    group["lr"] = cosine_lr(step, total, warmup, config.learning_rate)
                optimizer.zero_grad()
                loss = contrastive_backward(self.uff_, point, rgb, memory_budget_gb=config.memory_budget_gb)
                optimizer.step()
                losses.append(loss)
                step += 1
            self.loss_history_.append(float(np.mean(losses)) if losses else float("nan"))
        self.uff_.eval().requires_grad_(False)

    def _finalize_banks(self, banks: dict[str, MemoryBank], progress: bool) -> None:
        """Normalise and subsample: per-bank statistics and 10% each (paper) or the official quirks (compat)."""
        stats = {name: bank.statistics() for name, bank in banks.items()}
        if not self.config.compat:
            for name, bank in banks.items():
                bank.finalize(mean=stats[name][0], std=stats[name][1], progress=progress)
            return
        # Official TripleFeatures: every mean from the point bank, every std from the RGB bank; the RGB and fused
        # coresets get 10% of the *point coreset's* size instead of their own.
        mean, std = stats["point"][0], stats["rgb"][1]
        point = banks["point"]
        all_point_rows = point.count // max(point.store.chunks[0].shape[1], 1)
        point.finalize(mean=mean, std=std, n_select=max(1, int(self.config.coreset_fraction * all_point_rows)))
        for name in ("rgb", "fused"):
            size = max(1, int(self.config.coreset_fraction * len(point)))
            banks[name].finalize(mean=mean, std=std, n_select=size, progress=progress)

    def fit(
        self, records: Sequence[SampleRecord], *, progress: bool = False, errors: list[DataError] | None = None
    ) -> M3DM:
        """UFF (optional) → three banks → DLF one-class SVMs on the training samples' own scores."""
        if not records:
            raise ValueError("M3DM.fit needs at least one nominal training sample")
        prepared = self.pipeline.preprocess(records, progress=progress, errors=errors)
        kept: list[SampleRecord] = []
        first: PatchSets | None = None
        for record, features in self.pipeline.iter_features(prepared, progress=progress, errors=errors):
            kept.append(record)
            first = first or self._sets(features)
        if first is None:
            raise ValueError("no usable training sample (all were reported as bad)")
        self.uff_: FeatureFusionBlock | None = None
        self.loss_history_ = []
        if self.config.use_uff:
            self._train_uff(kept, first, progress)
        banks = {name: self.config.new_bank(self.cache_dir, offset) for offset, name in enumerate(BANKS)}
        for record in kept:
            sets = self._sets(self.pipeline.extract(record))
            background = int((~sets.foreground).sum())
            banks["point"].add(sets.point[sets.foreground], uncounted_zero_rows=background)
            banks["rgb"].add(sets.rgb)
            banks["fused"].add(self.fused(sets))
        self.n_collected_ = {name: bank.collected for name, bank in banks.items()}
        self._finalize_banks(banks, progress)
        self.banks_ = banks
        self._fit_dlf(kept, progress)
        self.n_train_samples_ = len(kept)
        self.fitted_ = True
        return self

    def _fit_dlf(self, records: list[SampleRecord], progress: bool) -> None:
        """Linear OCSVMs on the training samples' weighted (point, rgb, fused) scores and per-pixel maps."""
        from sklearn.linear_model import SGDOneClassSVM

        scores, pixels = [], []
        for record in tqdm(records, desc="fit dlf", disable=not progress, leave=False):
            score, maps = self._bank_outputs(self.pipeline.extract(record))
            scores.append(score)
            pixels.append(maps.reshape(3, -1).T)
        fusers = []
        for data in (np.stack(scores), np.concatenate(pixels)):
            svm = SGDOneClassSVM(nu=self.config.ocsvm_nu, max_iter=self.config.ocsvm_max_iter, random_state=42)
            fusers.append(torch.from_numpy(np.asarray(svm.fit(data.astype(np.float64)).coef_, dtype=np.float64)))
        self.detect_coef_, self.segment_coef_ = fusers

    # ------------------------------------------------------------------ inference
    def _bank_outputs(self, features: SampleFeatures) -> tuple[np.ndarray, np.ndarray]:
        """(3 weighted image scores, 3×S×S weighted maps) in the order point, rgb, fused."""
        config = self.config
        sets = self._sets(features)
        point_dist = torch.zeros(sets.point.shape[0])
        point_score = 0.0
        if sets.foreground.any():
            found, point_score = self.banks_["point"].score(sets.point[sets.foreground], reweight_k=config.reweight_k)
            point_dist[sets.foreground] = found
        rgb_dist, rgb_score = self.banks_["rgb"].score(sets.rgb, reweight_k=config.reweight_k)
        fused_dist, fused_score = self.banks_["fused"].score(self.fused(sets), reweight_k=config.reweight_k)
        grids = (config.point_grid, config.rgb_grid, config.point_grid)
        maps = [
            patch_map(dist, grid, config.image_size, smoothing=config.smoothing, sigma=config.sigma).numpy()
            for dist, grid in zip((point_dist, rgb_dist, fused_dist), grids, strict=True)
        ]
        weights = np.asarray(config.lambdas, dtype=np.float64)
        score = weights * np.array([point_score, rgb_score, fused_score])
        return score, weights[:, None, None] * np.stack(maps).astype(np.float64)

    def predict(
        self, records: Sequence[SampleRecord], *, progress: bool = False, errors: list[DataError] | None = None
    ) -> Iterator[Prediction]:
        """DLF score (``detect_fuser.score_samples``) and map (``seg_fuser.score_samples``) per sample."""
        self.check_fitted()
        size = self.config.image_size
        detect, segment = self.detect_coef_.numpy(), self.segment_coef_.numpy()
        prepared = self.pipeline.preprocess(records, progress=False, errors=errors)
        for record, features in self.pipeline.iter_features(
            prepared, progress=progress, errors=errors, description="predict m3dm"
        ):
            score, maps = self._bank_outputs(features)
            anomaly_map = np.tensordot(segment, maps, axes=1).reshape(size, size).astype(np.float32)
            inputs = features.inputs
            yield Prediction(
                record=record,
                pred_score=float(score @ detect),
                anomaly_map=anomaly_map,
                label=inputs.label,
                gt_mask=inputs.gt_mask,
                geometry=inputs,
                modality_maps={name: maps[i].astype(np.float32) for i, name in enumerate(BANKS)},
            )

    # ------------------------------------------------------------------ persistence
    def get_config(self) -> dict[str, Any]:
        """Hyperparameters, extractor configuration, bank sizes and DLF weights."""
        config: dict[str, Any] = {"method": self.name, "hparams": asdict(self.config)}
        if getattr(self, "fitted_", False):
            config["pipeline"] = self.pipeline.config()
            config["n_train_samples"] = self.n_train_samples_
            config["banks"] = {
                name: {"rows": len(bank), "collected": self.n_collected_.get(name, 0), "dim": int(bank.bank.shape[1])}
                for name, bank in self.banks_.items()
                if bank.bank is not None
            }
            config["channels"] = [self.banks_["point"].bank.shape[1], self.banks_["rgb"].bank.shape[1]]
            config["loss_history"] = self.loss_history_
            config["dlf"] = {"detect_coef": self.detect_coef_.tolist(), "segment_coef": self.segment_coef_.tolist()}
        return config

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Banks with their (mean, std), the OCSVM weights and, with UFF, its weights."""
        self.check_fitted()
        tensors: dict[str, torch.Tensor] = {
            "dlf.detect_coef": self.detect_coef_,
            "dlf.segment_coef": self.segment_coef_,
        }
        for name, bank in self.banks_.items():
            assert bank.bank is not None
            tensors[f"bank.{name}"] = bank.bank
            tensors[f"bank_stats.{name}"] = torch.tensor([bank.mean, bank.std], dtype=torch.float64)
        if self.uff_ is not None:
            tensors.update(prefixed(self.uff_.state_dict(), "uff"))
        return tensors

    @classmethod
    def from_state(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor], **overrides: Any) -> M3DM:
        """Rebuild a fitted M3DM; fails clearly when the configured extractors differ from training's."""
        hparams = {**config["hparams"], **{k: v for k, v in overrides.items() if k != "cache_dir"}}
        model = cls(M3DMConfig(**hparams), cache_dir=overrides.get("cache_dir"))
        model.check_pipeline(config.get("pipeline"))
        missing = [f"bank.{n}" for n in BANKS if f"bank.{n}" not in tensors]
        if missing or "dlf.detect_coef" not in tensors:
            raise ModelFileError(f"M3DM model file lacks tensors: {missing or ['dlf.detect_coef']}")
        model.banks_ = {}
        for offset, name in enumerate(BANKS):
            bank = model.config.new_bank(model.cache_dir, offset)
            mean, std = tensors[f"bank_stats.{name}"].tolist()
            bank.load(tensors[f"bank.{name}"], mean, std)
            model.banks_[name] = bank
        model.uff_ = None
        uff_state = split_prefixed(tensors, "uff")
        if uff_state:
            xyz_dim, rgb_dim = config["channels"]
            model.uff_ = FeatureFusionBlock(int(xyz_dim), int(rgb_dim))
            model.uff_.load_state_dict(uff_state)
            model.uff_.eval().requires_grad_(False)
        model.detect_coef_ = tensors["dlf.detect_coef"].double()
        model.segment_coef_ = tensors["dlf.segment_coef"].double()
        model.loss_history_ = list(config.get("loss_history", []))
        model.n_collected_ = {k: int(v.get("collected", 0)) for k, v in config.get("banks", {}).items()}
        model.n_train_samples_ = int(config.get("n_train_samples", 0))
        model.fitted_ = True
        return model
