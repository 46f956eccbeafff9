"""M3DM: Multi-3D-Memory (Wang et al., CVPR 2023): three memory banks fused at the decision layer.

Point features are projected onto a 56×56 grid, RGB features sit on a 28×28 grid (pooled 2× to 56 for fusion),
and UFF fuses the two per patch. Three PatchCore banks (RGB, point, fused) each give a distance map and a
reweighted image score; decision-layer fusion (DLF) combines them with two linear one-class SVMs, one on the
3-vectors of image scores, one on the per-pixel 3-vectors of maps. Like the official code, the SVMs are fitted on
the *training* samples scored against banks built from those same samples.

``variant="double"`` is the official ``DINO+Point_MAE`` method (``DoubleRGBPointFeatures``): the point and RGB
banks only, no UFF, the same DLF on 2-vectors. With ``uff_scope="all"`` (the official ``fusion_pretrain.py``)
one UFF is trained on the union of every category of a run, through :meth:`M3DM.fit_shared`, before the
per-category banks are built.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm

from mmiad.data.errors import DataError
from mmiad.data.sample import SampleRecord
from mmiad.features.pipeline import SampleFeatures
from mmiad.methods.base import AnomalyModel, Scored
from mmiad.methods.m3dm.config import DOUBLE_SCORE_SCALE, M3DMConfig
from mmiad.methods.m3dm.fusion import FeatureFusionBlock, contrastive_backward, cosine_lr, official_training_rgb
from mmiad.methods.m3dm.patches import PatchSets, SharedUFF, patch_sets
from mmiad.methods.memorybank import MemoryBank
from mmiad.methods.memorybank.maps import patch_map
from mmiad.methods.modelfile import ModelFileError, prefixed, split_prefixed
from mmiad.methods.registry import register_method


@register_method("m3dm")
class M3DM(AnomalyModel):
    """Multi-3D-Memory: three (or two) memory banks + UFF + decision-layer fusion (Wang et al., CVPR 2023).

    See :class:`M3DMConfig`. Learned state: ``uff_`` (None without UFF), ``banks_`` (point, rgb[, fused]),
    ``detect_coef_`` and ``segment_coef_`` (the linear OCSVM weights: ``score_samples(x) = x·coef``).

    Multi-category runs: the engine calls :meth:`fit_shared` once, on one instance, with every category's
    training records, then :meth:`use_shared` with its result on each category's model before :meth:`fit`.
    Without that call (a single ``fit``) the UFF sees only the records given to ``fit``, which is what
    ``uff_scope="category"`` always does.
    """

    config_class = M3DMConfig
    config: M3DMConfig
    importable = True
    uff_: FeatureFusionBlock | None
    tiny_hparams: ClassVar[dict[str, Any]] = {
        "image_size": 64,
        "rgb_grid": 8,
        "point_grid": 16,
        "epochs": 2,
        "batch_size": 2,
    }
    _shared: SharedUFF | None = None

    def _sets(self, features: SampleFeatures) -> PatchSets:
        return patch_sets(features, self.config.rgb_grid, self.config.point_grid)

    def _on_device(self, block: FeatureFusionBlock) -> FeatureFusionBlock:
        return block.to(self.device)

    def fused(self, sets: PatchSets) -> torch.Tensor:
        """point_grid²×(C3 + C2) fused rows (CPU float32): UFF's MLP outputs, or the plain concatenation."""
        if self.uff_ is None:
            return torch.cat([sets.point, sets.rgb_fine], dim=1)
        return self.uff_.fuse_on_device(sets.point, sets.rgb_fine, self.config.precision)

    # ------------------------------------------------------------------ shared (multi-category) training
    def fit_shared(
        self,
        records_by_category: Mapping[str, Sequence[SampleRecord]],
        *,
        progress: bool = False,
        errors: list[DataError] | None = None,
    ) -> SharedUFF | None:
        """Train the UFF of every category at once (official ``fusion_pretrain.py`` over all classes).

        Each category contributes its first ``max_train_samples`` usable training samples, as the official
        feature dump does. Unreadable samples are skipped here without being added to ``errors``: each
        category's :meth:`fit` reads them again and reports them once. Returns None when nothing is shared (no
        UFF, ``double``, or ``uff_scope="category"``); the engine then just fits per category.
        """
        if not self.config.trains_uff or self.config.uff_scope != "all" or self.config.uff_checkpoint:
            return None
        union: list[SampleRecord] = []
        skipped: list[DataError] = []  # each category's fit reads (and reports) the same bad samples again
        for records in records_by_category.values():
            union.extend(self._usable(records, progress, skipped))
        if not union:
            raise ValueError("no usable training sample in any category (all were reported as bad)")
        history = self._train_uff(union, progress)
        assert self.uff_ is not None  # just trained
        return SharedUFF(self.uff_, history, sorted(records_by_category), len(union))

    def use_shared(self, shared: Any) -> None:
        """Use ``shared`` (from :meth:`fit_shared`) instead of training a UFF in :meth:`fit`."""
        self._shared = shared

    def _usable(
        self, records: Sequence[SampleRecord], progress: bool, errors: list[DataError] | None
    ) -> list[SampleRecord]:
        """The first ``max_train_samples`` records *of each category*, less those that cannot be read.

        Per category, so a unified run over several categories keeps each one's first samples.
        """
        limit = self.config.max_train_samples
        taken: dict[str, int] = {}
        chosen = []
        for record in records:
            if limit is None or taken.get(record.category, 0) < limit:
                chosen.append(record)
                taken[record.category] = taken.get(record.category, 0) + 1
        prepared = self.pipeline.preprocess(chosen, progress=progress, errors=errors)
        return [record for record, _ in self.pipeline.iter_features(prepared, progress=progress, errors=errors)]

    # ------------------------------------------------------------------ training
    def _train_uff(self, records: list[SampleRecord], progress: bool) -> list[float]:
        """Train ``self.uff_`` on ``records`` (shuffled each epoch); returns the mean loss per epoch."""
        config = self.settings
        torch.manual_seed(config.seed)
        # Initialised on the CPU and then moved, so every device starts from the same weights.
        self.uff_ = self._on_device(FeatureFusionBlock(*self._uff_dims(records[0])))
        optimizer = torch.optim.AdamW(
            self.uff_.parameters(), lr=config.learning_rate, betas=(0.9, 0.95), weight_decay=config.weight_decay
        )
        generator = torch.Generator().manual_seed(config.seed)
        batches_per_epoch = -(-len(records) // config.batch_size)
        total, warmup = config.epochs * batches_per_epoch, config.warmup_epochs * batches_per_epoch
        history: list[float] = []
        for epoch in tqdm(range(config.epochs), desc="train uff", disable=not progress, leave=False):
            order = torch.randperm(len(records), generator=generator).tolist()
            losses = []
            optimizer.zero_grad()
            pending = 0
            for batch, start in enumerate(range(0, len(order), config.batch_size)):
                if batch % config.accum_iter == 0:  # per-iteration schedule, set at each accumulation group
                    for group in optimizer.param_groups:
                        group["lr"] = cosine_lr(epoch * batches_per_epoch + batch, total, warmup, config.learning_rate)
                point, rgb = self._uff_batch([records[i] for i in order[start : start + config.batch_size]], generator)
                if point.shape[0] >= 2:
                    budget = config.memory_budget_gb
                    scale = 1.0 / config.accum_iter
                    losses.append(
                        contrastive_backward(
                            self.uff_, point, rgb, memory_budget_gb=budget, scale=scale, precision=config.precision
                        )
                    )
                    pending += 1
                if (batch + 1) % config.accum_iter == 0:
                    optimizer.step()
                    optimizer.zero_grad()
                    pending = 0
            if pending and not config.compat:
                optimizer.step()
            history.append(float(np.mean(losses)) if losses else float("nan"))
        self.uff_.eval().requires_grad_(False)
        return history

    def _uff_dims(self, record: SampleRecord) -> tuple[int, int]:
        """(point, RGB) feature widths, read from one sample."""
        sets = self._sets(self.pipeline.extract(record))
        return int(sets.point.shape[1]), int(sets.rgb.shape[1])

    def _uff_batch(self, records: list[SampleRecord], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Aligned (point, RGB) rows of a batch of images (see ``uff_patches``), capped at ``uff_max_patches``."""
        point_rows, rgb_rows = [], []
        for record in records:
            sets = self._sets(self.pipeline.extract(record))
            keep = (sets.point != 0).all(dim=1) if self.config.uff_patches == "nonzero" else sets.foreground
            point_rows.append(sets.point[keep])
            rgb = official_training_rgb(sets.rgb, len(sets.point)) if self.config.compat else sets.rgb_fine
            rgb_rows.append(rgb[keep])
        point, rgb = torch.cat(point_rows), torch.cat(rgb_rows)
        cap = self.config.uff_max_patches
        if cap is not None and point.shape[0] > cap:
            keep = torch.randperm(point.shape[0], generator=generator)[:cap]
            point, rgb = point[keep], rgb[keep]
        return point, rgb

    def _finalize_banks(self, banks: dict[str, MemoryBank], progress: bool) -> None:
        """Normalise and subsample each bank (see ``point_coreset`` and ``compat`` in :class:`M3DMConfig`)."""
        config = self.config
        stats = {name: bank.statistics() for name, bank in banks.items()}
        # Official: every mean from the point bank, every std from the RGB bank (compat); paper: each its own.
        norms = {name: (stats["point"][0], stats["rgb"][1]) if config.compat else stats[name] for name in banks}
        point = banks["point"]
        point_select = None  # all_rows: fraction of the stored rows, which are all rows
        if config.point_coreset == "foreground" and config.compat:
            all_rows = point.count // max(point.store.chunks[0].shape[1], 1)
            point_select = max(1, int(config.coreset_fraction * all_rows))
        point.finalize(mean=norms["point"][0], std=norms["point"][1], n_select=point_select, progress=progress)
        for name in banks:
            if name == "point":
                continue
            # Official: the RGB and fused coresets get 10 % of the *point coreset's* size (compat).
            size = max(1, int(config.coreset_fraction * len(point))) if config.compat else None
            banks[name].finalize(mean=norms[name][0], std=norms[name][1], n_select=size, progress=progress)
        if config.point_coreset == "all_rows" and config.variant == "triple":
            # TripleFeatures.run_coreset: drop normalised rows with any exact zero, append one all-zero row.
            assert point.bank is not None
            kept = point.bank[(point.bank != 0).all(dim=1)]
            point.load(torch.cat([kept, torch.zeros(1, point.bank.shape[1])]), point.mean, point.std)

    def fit(
        self, records: Sequence[SampleRecord], *, progress: bool = False, errors: list[DataError] | None = None
    ) -> M3DM:
        """UFF (shared, own, or none) → banks → DLF one-class SVMs on the training samples' own scores."""
        if not records:
            raise ValueError("M3DM.fit needs at least one nominal training sample")
        config = self.config
        kept = self._usable(records, progress, errors)
        if not kept:
            raise ValueError("no usable training sample (all were reported as bad)")
        self.uff_ = None
        self.loss_history_: list[float] = []
        self.uff_info_: dict[str, Any] = {}
        if config.trains_uff and config.uff_checkpoint:
            from mmiad.methods.m3dm.official import load_official_uff

            self.uff_ = self._on_device(load_official_uff(config.uff_checkpoint, *self._uff_dims(kept[0])))
            self.uff_info_ = {"scope": "imported", "file": config.uff_checkpoint}
        elif config.trains_uff and self._shared is not None:
            self.uff_, self.loss_history_ = self._on_device(self._shared.block), list(self._shared.loss_history)
            self.uff_info_ = {"scope": "shared", "categories": self._shared.categories}
            self.uff_info_["n_samples"] = self._shared.n_samples
        elif config.trains_uff:
            self.loss_history_ = self._train_uff(kept, progress)
            self.uff_info_ = {"scope": "fit", "categories": sorted({r.category for r in kept}), "n_samples": len(kept)}
        self._build_banks((self._sets(self.pipeline.extract(record)) for record in kept), progress)
        self._fit_dlf(kept, progress)
        self.n_train_samples_ = len(kept)
        self.fitted_ = True
        return self

    def _build_banks(self, training_sets: Iterable[PatchSets], progress: bool = False) -> None:
        """Collect every training image's patch rows into the banks, then normalise and subsample them."""
        config = self.config
        banks = {name: config.new_bank(self.cache_dir, offset) for offset, name in enumerate(config.banks)}
        for sets in training_sets:
            if config.point_coreset == "all_rows":
                banks["point"].add(sets.point)
            else:
                background = int((~sets.foreground).sum())
                banks["point"].add(sets.point[sets.foreground], uncounted_zero_rows=background)
            banks["rgb"].add(sets.rgb)
            if "fused" in banks:
                banks["fused"].add(self.fused(sets))
        self.n_collected_ = {name: bank.collected for name, bank in banks.items()}
        self._finalize_banks(banks, progress)
        self.banks_ = banks

    def _fit_dlf(self, records: list[SampleRecord], progress: bool) -> None:
        """Linear OCSVMs on the training samples' weighted per-bank scores and per-pixel maps."""
        from sklearn.linear_model import SGDOneClassSVM

        scores, pixels = [], []
        for record in tqdm(records, desc="fit dlf", disable=not progress, leave=False):
            score, maps = self._bank_outputs(self.pipeline.extract(record))
            scores.append(score)
            pixels.append(maps.reshape(len(maps), -1).T)
        fusers = []
        for data in (np.stack(scores), np.concatenate(pixels)):
            svm = SGDOneClassSVM(nu=self.config.ocsvm_nu, max_iter=self.config.ocsvm_max_iter, random_state=42)
            fusers.append(torch.from_numpy(np.asarray(svm.fit(data.astype(np.float64)).coef_, dtype=np.float64)))
        self.detect_coef_, self.segment_coef_ = fusers

    # ------------------------------------------------------------------ inference
    def _bank_outputs(self, features: SampleFeatures) -> tuple[np.ndarray, np.ndarray]:
        """(weighted image scores, B×S×S weighted maps) per bank, in the order of ``config.banks``."""
        return self._score_sets(self._sets(features))

    def _score_sets(self, sets: PatchSets) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`_bank_outputs` of one image's patch rows."""
        config = self.settings
        scale = DOUBLE_SCORE_SCALE if config.variant == "double" else 1.0
        k = config.reweight_k
        if config.point_coreset == "all_rows":
            point_dist, point_score = self.banks_["point"].score(sets.point, reweight_k=k, score_scale=scale)
        else:
            point_dist, point_score = torch.zeros(sets.point.shape[0]), 0.0
            if sets.foreground.any():
                found, point_score = self.banks_["point"].score(
                    sets.point[sets.foreground], reweight_k=k, score_scale=scale
                )
                point_dist[sets.foreground] = found
        results = [(point_dist, point_score, config.point_grid)]
        rgb_dist, rgb_score = self.banks_["rgb"].score(sets.rgb, reweight_k=k, score_scale=scale)
        results.append((rgb_dist, rgb_score, config.rgb_grid))
        if "fused" in self.banks_:
            fused_dist, fused_score = self.banks_["fused"].score(self.fused(sets), reweight_k=k)
            results.append((fused_dist, fused_score, config.point_grid))
        maps = [
            patch_map(dist, grid, config.image_size, smoothing=config.smoothing, sigma=config.sigma).numpy()
            for dist, _, grid in results
        ]
        weights = np.asarray(config.lambdas[: len(results)], dtype=np.float64)
        score = weights * np.array([value for _, value, _ in results])
        return score, weights[:, None, None] * np.stack(maps).astype(np.float64)

    def score(self, features: Sequence[SampleFeatures]) -> list[Scored]:
        """DLF score (``detect_fuser.score_samples``) and map (``seg_fuser.score_samples``) per sample."""
        size = self.config.image_size
        detect, segment = self.detect_coef_.numpy(), self.segment_coef_.numpy()
        results = []
        for sample in features:
            score, maps = self._bank_outputs(sample)
            anomaly_map = np.tensordot(segment, maps, axes=1).reshape(size, size).astype(np.float32)
            results.append(
                Scored(
                    score=float(score @ detect),
                    anomaly_map=anomaly_map,
                    modality_maps={name: maps[i].astype(np.float32) for i, name in enumerate(self.config.banks)},
                )
            )
        return results

    # ------------------------------------------------------------------ persistence
    def learned_facts(self) -> dict[str, Any]:
        """Bank sizes, feature widths, where the UFF came from, its loss history and the DLF weights."""
        point, rgb = self.banks_["point"].bank, self.banks_["rgb"].bank
        assert point is not None and rgb is not None  # a fitted (or loaded) model's point and RGB banks are filled
        return {
            "n_train_samples": self.n_train_samples_,
            "banks": {
                name: {"rows": len(bank), "collected": self.n_collected_.get(name, 0), "dim": int(bank.bank.shape[1])}
                for name, bank in self.banks_.items()
                if bank.bank is not None
            },
            "channels": [point.shape[1], rgb.shape[1]],
            "loss_history": self.loss_history_,
            "uff": getattr(self, "uff_info_", {}),
            "dlf": {"detect_coef": self.detect_coef_.tolist(), "segment_coef": self.segment_coef_.tolist()},
        }

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
            tensors.update(prefixed({k: v.cpu() for k, v in self.uff_.state_dict().items()}, "uff"))
        return tensors

    def load_state(self, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """The variant's banks with their statistics, UFF when stored, and the DLF weights."""
        names = self.config.banks
        missing = [f"bank.{n}" for n in names if f"bank.{n}" not in tensors]
        missing += [f"bank_stats.{n}" for n in names if f"bank_stats.{n}" not in tensors]
        missing += [k for k in ("dlf.detect_coef", "dlf.segment_coef") if k not in tensors]
        if missing:
            raise ModelFileError(f"M3DM model file lacks tensors: {', '.join(missing)}")
        self.banks_ = {}
        for offset, name in enumerate(names):
            bank = self.config.new_bank(self.cache_dir, offset)
            mean, std = tensors[f"bank_stats.{name}"].tolist()
            bank.load(tensors[f"bank.{name}"], mean, std)
            self.banks_[name] = bank
        self.uff_ = None
        uff_state = split_prefixed(tensors, "uff")
        if uff_state:
            xyz_dim, rgb_dim = config["channels"]
            self.uff_ = FeatureFusionBlock(int(xyz_dim), int(rgb_dim))
            self.uff_.load_state_dict(uff_state)
            self.uff_ = self._on_device(self.uff_.eval().requires_grad_(False))
        self.detect_coef_ = tensors["dlf.detect_coef"].double()
        self.segment_coef_ = tensors["dlf.segment_coef"].double()
        self.loss_history_ = list(config.get("loss_history", []))
        self.uff_info_ = dict(config.get("uff", {}))
        self.n_collected_ = {k: int(v.get("collected", 0)) for k, v in config.get("banks", {}).items()}
        self.n_train_samples_ = int(config.get("n_train_samples", 0))
