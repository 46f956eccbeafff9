"""G2SF: Geometry-Guided Score Fusion (Tao, Cao, Du, ICCV 2025), per category.

Two unimodal PatchCore banks (RGB 28×28, points 56×56) give each patch its nearest prototypes; a learned local
scale network (LSPN) and a global weight σ turn the two Euclidean distances into one unified, anisotropic score,
trained on synthetic pseudo-anomalies. See :mod:`mmiad.methods.g2sf.config` for the settings and the package
README for provenance and deviations.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from mmiad.data.errors import DataError
from mmiad.data.sample import SampleRecord
from mmiad.features.pipeline import SampleFeatures
from mmiad.methods.base import AnomalyModel, Scored
from mmiad.methods.g2sf.banks import UnimodalBanks, patch_rows
from mmiad.methods.g2sf.config import G2SFConfig
from mmiad.methods.g2sf.lspn import LSPN, GlobalScale, pair_score
from mmiad.methods.g2sf.pseudo import build_fusion_set, pick_sources
from mmiad.methods.g2sf.training import LSPNTrainer
from mmiad.methods.memorybank.maps import patch_map
from mmiad.methods.modelfile import ModelFileError, prefixed, split_prefixed
from mmiad.methods.registry import register_method
from mmiad.utils.compute import autocast


@register_method("g2sf")
class G2SF(AnomalyModel):
    """Geometry-Guided Score Fusion: two unimodal banks fused by a learned local scale (Tao et al., ICCV 2025).

    Learned state: ``banks_`` (RGB with its scalar mean/std, point), ``lspn_``, ``scale_`` (θ), ``mu_``.
    Multi-category runs: :meth:`fit_shared` draws the cross-category 3D anomaly-source list once (the official
    ``anomaly_source_path.json``); a single :meth:`fit` draws its sources from its own records.
    """

    config_class = G2SFConfig
    config: G2SFConfig
    importable = True
    tiny_hparams: ClassVar[dict[str, Any]] = {
        "image_size": 64,
        "rgb_grid": 8,
        "point_grid": 16,
        "n_anomalies": 6,
        "epochs": 2,
        "hidden": 16,
        "emb_dim": 8,
        "device": "cpu",
    }
    _sources: list[SampleRecord] | None = None

    # ------------------------------------------------------------------ training
    def fit_shared(
        self,
        records_by_category: Mapping[str, Sequence[SampleRecord]],
        *,
        progress: bool = False,
        errors: list[DataError] | None = None,
    ) -> list[SampleRecord]:
        """The anomaly-source list: ``n_sources_per_category`` shuffled training records of every category."""
        return pick_sources(dict(records_by_category), self.config.n_sources_per_category, self.config.seed)

    def use_shared(self, shared: Any) -> None:
        """Use the cross-category source list from :meth:`fit_shared`."""
        self._sources = list(shared) if shared else None

    def _new_banks(self) -> UnimodalBanks:
        config = self.config
        return UnimodalBanks(
            config.new_bank(self.cache_dir, 0), config.new_bank(self.cache_dir, 1), config.rgb_grid, config.point_grid
        )

    def fit(
        self, records: Sequence[SampleRecord], *, progress: bool = False, errors: list[DataError] | None = None
    ) -> G2SF:
        """Banks from the nominal samples → pseudo-anomalies → fusion set → LSPN + σ."""
        if not records:
            raise ValueError("G2SF.fit needs at least one nominal training sample")
        config = self.config
        started = time.perf_counter()
        prepared = self.pipeline.preprocess(records, progress=progress, errors=errors)
        banks = self._new_banks()
        kept: list[SampleRecord] = []
        for record, features in self.pipeline.iter_features(prepared, progress=progress, errors=errors):
            banks.add(patch_rows(features, config.rgb_grid, config.point_grid))
            kept.append(record)
        if not kept:
            raise ValueError("no usable training sample (all were reported as bad)")
        self.n_collected_ = {"rgb": banks.rgb.collected, "point": banks.point.collected}
        banks.finalize(progress)
        self.banks_ = banks
        self.timings_ = {"banks_s": time.perf_counter() - started}
        if config.official_fusion:
            self._load_official(kept[0].category)
        else:
            self._train_fusion(kept, progress)
        self.n_train_samples_ = len(kept)
        self.fitted_ = True
        return self

    def _train_fusion(self, kept: list[SampleRecord], progress: bool) -> None:
        """Pseudo-anomalies → fusion set → LSPN + σ (the official stages 2 and 3)."""
        config = self.config
        chosen = self._sources or pick_sources({kept[0].category: kept}, config.n_sources_per_category, config.seed)
        sources = self.pipeline.preprocess(chosen, errors=[]) or kept
        save_dir = Path(self.cache_dir) / "g2sf" / "pseudo" / kept[0].category if self.cache_dir else None
        started = time.perf_counter()
        data, self.pseudo_counts_ = build_fusion_set(
            self.pipeline, self.banks_, config, kept, sources, save_dir=save_dir, progress=progress
        )
        self.timings_["synthesis_s"] = time.perf_counter() - started
        started = time.perf_counter()
        trained = LSPNTrainer(config, self.banks_, self.device).train(data, progress)
        self.timings_["lspn_s"] = time.perf_counter() - started
        self.lspn_, self.scale_, self.mu_ = trained.network, trained.scale, trained.mu
        self.margin_, self.best_epoch_, self.history_ = trained.margin, trained.best_epoch, trained.history

    def _load_official(self, category: str) -> None:
        """LSPN, θ and μ from the released files of ``category`` (see :mod:`mmiad.methods.g2sf.official`)."""
        from mmiad.methods.g2sf.official import fusion_folder, load_official_fusion

        config = self.config
        assert config.official_fusion is not None and self.banks_.rgb.bank is not None
        in_dim = self.banks_.split + int(self.banks_.point.bank.shape[1])  # type: ignore[union-attr]
        folder = fusion_folder(config.official_fusion, category)
        self.lspn_, theta, self.mu_ = load_official_fusion(
            folder, in_dim, config.hidden, config.emb_dim, config.dropout
        )
        self.scale_ = GlobalScale().requires_grad_(False)
        self.scale_.theta.copy_(theta)
        self.margin_, self.best_epoch_, self.history_ = 0.0, -1, []
        self.pseudo_counts_ = {"imported_from": str(folder)}  # type: ignore[dict-item]

    # ------------------------------------------------------------------ scoring
    def prepare_scoring(self) -> None:
        """Networks in eval mode on the device."""
        self.lspn_ = self.lspn_.to(self.device).eval()
        self.scale_ = self.scale_.to(self.device)

    @torch.no_grad()
    def patch_scores(self, features: SampleFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        """(point_grid² fused patch scores, point_grid²×2 raw NN distances) of one sample."""
        config = self.settings
        ranks = config.anchor + 1
        found = self.banks_.neighbours(patch_rows(features, config.rgb_grid, config.point_grid), ranks)
        device = self.device
        feats, background = found.features.to(device), found.background.to(device)
        sigma, mu = self.scale_(), self.mu_.to(device)
        per_rank = []
        for rank in range(ranks if config.scoring_mode != "zero" else 1):
            protos = self.banks_.coreset_rows(found.indices, rank, ranks).to(device)
            with autocast(device, config.precision):
                score, _, _ = pair_score(self.lspn_, sigma, feats, protos, self.banks_.split, mu, background)
            per_rank.append(score.float())
        stacked = torch.stack(per_rank, dim=1)
        if config.scoring_mode == "max":
            fused = stacked.max(dim=1).values
        elif config.scoring_mode == "average":
            fused = stacked.mean(dim=1)
        else:  # min, or zero (one rank)
            fused = stacked.min(dim=1).values
        return fused.cpu(), found.distances

    def score(self, features: Sequence[SampleFeatures]) -> list[Scored]:
        """Image score = max fused patch score; map = bilinear to the input size + blur; 2d/3d = NN maps."""
        config = self.settings
        results = []
        for item in features:
            fused, distances = self.patch_scores(item)

            def to_map(values: torch.Tensor) -> np.ndarray:
                return patch_map(
                    values, config.point_grid, config.image_size, smoothing=config.smoothing, sigma=config.sigma
                ).numpy()

            results.append(
                Scored(
                    score=float(fused.max()),
                    anomaly_map=to_map(fused).astype(np.float32),
                    modality_maps={"2d": to_map(distances[:, 0]), "3d": to_map(distances[:, 1])},
                )
            )
        return results

    # ------------------------------------------------------------------ persistence
    def learned_facts(self) -> dict[str, Any]:
        """Dims, bank sizes, μ, σ, the SVDD margin, the pseudo-set counts and the training history."""
        assert self.banks_.rgb.bank is not None and self.banks_.point.bank is not None
        return {
            "n_train_samples": self.n_train_samples_,
            "dims": [int(self.banks_.rgb.bank.shape[1]), int(self.banks_.point.bank.shape[1])],
            "banks": {
                "rgb": {"rows": len(self.banks_.rgb), "collected": self.n_collected_.get("rgb", 0)},
                "point": {"rows": len(self.banks_.point), "collected": self.n_collected_.get("point", 0)},
            },
            "mu": [float(v) for v in self.mu_],
            "sigma": [float(v) for v in self.scale_()],
            "margin": getattr(self, "margin_", None),
            "best_epoch": getattr(self, "best_epoch_", None),
            "pseudo": getattr(self, "pseudo_counts_", {}),
            "history": getattr(self, "history_", []),
            "timings": getattr(self, "timings_", {}),
        }

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Coresets, the RGB scalar statistics, μ, θ and the LSPN weights."""
        self.check_fitted()
        assert self.banks_.rgb.bank is not None and self.banks_.point.bank is not None
        tensors = {
            "bank.rgb": self.banks_.rgb.bank,
            "bank.point": self.banks_.point.bank,
            "bank_stats.rgb": torch.tensor([self.banks_.rgb.mean, self.banks_.rgb.std], dtype=torch.float64),
            "score_mean": self.mu_.float(),
            "global_scale": self.scale_.theta.detach().cpu().float(),
        }
        tensors.update(prefixed({k: v.detach().cpu() for k, v in self.lspn_.state_dict().items()}, "lspn"))
        return tensors

    def load_state(self, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Banks, statistics, θ and the LSPN from a model file."""
        needed = ("bank.rgb", "bank.point", "bank_stats.rgb", "score_mean", "global_scale")
        missing = [name for name in needed if name not in tensors]
        if missing:
            raise ModelFileError(f"G2SF model file lacks tensors: {', '.join(missing)}")
        banks = self._new_banks()
        mean, std = tensors["bank_stats.rgb"].tolist()
        banks.rgb.load(tensors["bank.rgb"], mean, std)
        banks.point.load(tensors["bank.point"], 0.0, 1.0)
        self.banks_ = banks
        self.mu_ = tensors["score_mean"].float()
        self.scale_ = GlobalScale().requires_grad_(False)
        self.scale_.theta.copy_(tensors["global_scale"].view(2, 1))
        settings = self.config
        self.lspn_ = LSPN(sum(int(d) for d in config["dims"]), settings.hidden, settings.emb_dim, settings.dropout)
        self.lspn_.load_state_dict(split_prefixed(tensors, "lspn"))
        self.lspn_.eval().requires_grad_(False)
        self.n_collected_ = {k: int(v.get("collected", 0)) for k, v in config.get("banks", {}).items()}
        self.n_train_samples_ = int(config.get("n_train_samples", 0))
        self.margin_ = float(config.get("margin") or 0.0)
        self.best_epoch_ = int(config.get("best_epoch") or -1)
        self.pseudo_counts_ = dict(config.get("pseudo", {}))
        self.history_ = list(config.get("history", []))
        self.timings_ = dict(config.get("timings", {}))
