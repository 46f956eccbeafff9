"""Uni-RCM: unified reference-guided crossmodal mapping (Wu & Xie, 2026; seed 000).

CFM's idea (predict each modality's features from the other, score the disagreement) made fit for *one model
over all categories*: the mapping networks get a learnable reference (:mod:`.blocks`) and an offline residual
quantizer (:mod:`.orq`) of the nominal features adds a second, memory-like score. Training runs on 56×56 grids
kept in memory; under ``torchrun`` it is data-parallel (:mod:`.distributed`).

Scoring (eq. 8): ``S = (S2D_map + β2D·S2D_orq) · (S3D_map + β3D·S3D_orq)``. The mapping scores are CFM's
discrepancy (distance of L2-normalised features, as the official code; eq. 7 writes a raw distance). Every map is
zero on the background. By default the ORQ maps are scored as the official inference does (each divided by its
per-image maximum, β2D=0.05, β3D=0.10), because the paper leaves their scale open; ``orq_normalization="none"``
with β=0.1/0.1 is the paper-literal variant. The final map is smoothed with the paper's Gaussian (σ=4);
``compat=True`` switches to the official PIL-uint8 blur for the pixel maps, the box cascade for the image score
and CFM's per-metric normalisations.
"""

from __future__ import annotations

from collections import ChainMap
from collections.abc import Mapping, Sequence
from itertools import accumulate
from pathlib import Path
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm

from mmiad.data.errors import DataError
from mmiad.data.sample import SampleRecord
from mmiad.features.pipeline import SampleFeatures
from mmiad.methods.base import AnomalyModel, Scored
from mmiad.methods.cfm.mapping import feature_discrepancy
from mmiad.methods.cfm.scoring import ScoredMap, finalize_map
from mmiad.methods.memorybank.bank import spill_folder
from mmiad.methods.modelfile import ModelFileError, prefixed, split_prefixed
from mmiad.methods.registry import register_method
from mmiad.methods.unircm.blocks import RefGuidedMapping, load_mapping_state
from mmiad.methods.unircm.config import STORE_DTYPES, UniRCMConfig
from mmiad.methods.unircm.memory import grid_store_budget, plan_training, training_memory_options
from mmiad.methods.unircm.orq import ResidualQuantizer
from mmiad.methods.unircm.resume import TrainingCheckpoint, training_fingerprint
from mmiad.methods.unircm.store import GridStore
from mmiad.methods.unircm.training import Grids, feature_mean_squares, foreground_of, mse_scales, train_mappings
from mmiad.utils import distributed as ddp
from mmiad.utils.compute import autocast


def normalize_orq_map(scores: torch.Tensor, how: str) -> torch.Tensor:
    """One image's ORQ map (zero on the background) scaled as ``orq_normalization`` says.

    ``image_max`` divides by the map's maximum when it is positive (the official inference), so the ORQ term of
    eq. 8 is at most β whatever the feature scale; ``none`` keeps the raw residual norms.
    """
    if how == "none":
        return scores
    if how != "image_max":
        raise ValueError(f"unknown orq_normalization {how!r}")
    peak = scores.max() if scores.numel() else scores.new_zeros(())
    return scores / peak if float(peak) > 0 else scores


def combine_scores(
    map_2d: torch.Tensor,
    map_3d: torch.Tensor,
    orq_2d: torch.Tensor | None,
    orq_3d: torch.Tensor | None,
    beta_2d: float,
    beta_3d: float,
) -> torch.Tensor:
    """Eq. 8: (S2D_map + β2D·S2D_orq) ⊙ (S3D_map + β3D·S3D_orq); without ORQ maps, CFM's product."""
    if orq_2d is None or orq_3d is None:
        return map_2d * map_3d
    return (map_2d + beta_2d * orq_2d) * (map_3d + beta_3d * orq_3d)


@register_method("unircm")
class UniRCM(AnomalyModel):
    """Uni-RCM: one unified model for all categories, reference-guided mapping + residual quantizer (Wu & Xie, 2026).

    Hyperparameters: :class:`UniRCMConfig`. Learned state: ``map_to_3d_``, ``map_to_2d_``
    (:class:`RefGuidedMapping`), ``orq_2d_``/``orq_3d_`` (:class:`ResidualQuantizer`, None without ORQ),
    ``loss_history_``, ``extensions_``.
    """

    config_class = UniRCMConfig
    config: UniRCMConfig
    importable = True
    tiny_hparams: ClassVar[dict[str, Any]] = {
        "image_size": 64,
        "grid_size": 8,
        "hidden": 16,
        "num_blocks": 1,
        "epochs": 2,
        "batch_size": 2,
        "orq_layers": 2,
        "codebook_size_2d": 8,
        "codebook_size_3d": 8,
        "orq_iterations": 3,
        "device": "cpu",
    }

    # ------------------------------------------------------------------ features
    def grids_of(self, features: SampleFeatures) -> Grids:
        """A sample's aligned rows on the G×G grid: (G·G×C2, G·G×C3, G·G foreground)."""
        grid_2d, grid_3d, foreground = features.on_grid(self.config.grid_size)
        return grid_2d.flatten(1).T.contiguous(), grid_3d.flatten(1).T.contiguous(), foreground.flatten()

    def _collect(
        self, records: Sequence[SampleRecord], offset: int, progress: bool, errors: list[DataError] | None
    ) -> GridStore:
        """Grids of the records this rank owns, keyed by global index (``offset`` + position).

        They stay in RAM up to ``memory_budget_gb`` and spill to the cache folder (or the temporary folder) beyond;
        the caller closes the store, which deletes spilled files.
        """
        spill = spill_folder(self.cache_dir)
        dtype, store = STORE_DTYPES[self.config.store_dtype], None
        for position, record in enumerate(tqdm(records, desc="features", disable=not progress, leave=False)):
            if not ddp.owned(offset + position):
                continue
            prepared = self.pipeline.preprocess([record], errors=errors)
            for _, features in self.pipeline.iter_features(prepared, errors=errors):
                grids = self.grids_of(features)
                if store is None:  # the preflight: refuses here, before every feature is extracted
                    channels = (grids[0].shape[1], grids[1].shape[1])
                    store = GridStore(grid_store_budget(self.config, *channels, self.device), dtype, spill)
                store.add(offset + position, *grids)
        return store if store is not None else GridStore(0, dtype, spill)

    # ------------------------------------------------------------------ training
    def _build_networks(self, channels_2d: int, channels_3d: int) -> None:
        torch.manual_seed(self.config.seed)
        c = self.config

        def build(in_features: int, out_features: int) -> RefGuidedMapping:
            return RefGuidedMapping(
                in_features,
                out_features,
                hidden=c.hidden,
                grid=c.grid_size,
                num_blocks=c.num_blocks,
                branches=c.branches,
            ).to(self.device)

        self.map_to_3d_ = build(channels_2d, channels_3d)
        self.map_to_2d_ = build(channels_3d, channels_2d)

    def _train(
        self, store: Mapping[int, Grids], kept: list[int], epochs: int, seed: int, progress: bool
    ) -> list[float]:
        c = self.config
        return train_mappings(
            self.map_to_3d_,
            self.map_to_2d_,
            store,
            kept,
            epochs=epochs,
            batch_size=c.batch_size,
            learning_rate=c.learning_rate,
            mse_weight=c.mse_weight,
            mse_scale=self.mse_scale_,
            seed=seed,
            progress=progress,
            plan=plan_training(self.map_to_3d_, self.map_to_2d_, **training_memory_options(c)),
            batch_norm=c.micro_batch_norm,
            precision=c.precision,
            resume=self._resume_point(kept),
        )

    def _resume_point(self, kept: list[int]) -> TrainingCheckpoint | None:
        """The checkpoint of this training when ``checkpoint_dir`` is set (one process only)."""
        if self.config.checkpoint_dir is None:
            return None
        if ddp.world_size() > 1:
            raise ValueError("checkpoint_dir is not supported under torchrun with several processes yet")
        widths = (self.map_to_3d_.in_features, self.map_to_2d_.in_features)
        fingerprint = training_fingerprint(self.config, kept, widths, self.feature_mean_squares_)
        return TrainingCheckpoint(Path(self.config.checkpoint_dir), fingerprint)

    def _foreground_rows(self, store: Mapping[int, Grids]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """All ranks' foreground rows in global sample order (at most ``orq_max_points``), on rank 0 only.

        The subsample is drawn over the global row count before any grid is read, so a spilled store never has
        to hold every row in memory at once and every rank count gives the same rows.
        """
        counts = {i: int(foreground_of(store, i).sum()) for i in store}
        merged = {k: v for part in ddp.all_gather_objects(counts) for k, v in part.items()}
        indices = sorted(merged)
        starts = dict(zip(indices, accumulate((merged[i] for i in indices), initial=0), strict=False))
        total, limit = sum(merged.values()), self.config.orq_max_points
        if limit is not None and total > limit:
            pick = torch.randperm(total, generator=torch.Generator().manual_seed(self.config.seed))[:limit]
        else:
            pick = torch.arange(total)
        order = torch.argsort(pick)
        sorted_pick = pick[order]
        local: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (output positions, 2D rows, 3D rows)
        for i in store:
            lo, hi = torch.searchsorted(sorted_pick, starts[i]), torch.searchsorted(sorted_pick, starts[i] + merged[i])
            if hi > lo:
                rows_2d, rows_3d, foreground = store[i]
                within = sorted_pick[lo:hi] - starts[i]
                local.append((order[lo:hi], rows_2d[foreground][within].float(), rows_3d[foreground][within].float()))
        gathered = ddp.gather_to_main(local)
        if gathered is None:
            return None
        parts = [part for rank_parts in gathered for part in rank_parts]
        out_2d = torch.empty(len(pick), parts[0][1].shape[1])
        out_3d = torch.empty(len(pick), parts[0][2].shape[1])
        for positions, rows_2d, rows_3d in parts:
            out_2d[positions], out_3d[positions] = rows_2d, rows_3d
        return out_2d, out_3d

    def _new_quantizer(self, size: int) -> ResidualQuantizer:
        c = self.config
        return ResidualQuantizer(
            [size] * c.orq_layers, iterations=c.orq_iterations, seed=c.seed, init=c.orq_init, use_faiss=c.use_faiss
        )

    def _share_quantizers(self) -> None:
        """Rank 0's codebooks on every rank."""
        assert self.orq_2d_ is not None and self.orq_3d_ is not None  # only called once both are fitted
        codebooks = ddp.broadcast_from_main(
            [self.orq_2d_.codebooks_, self.orq_3d_.codebooks_] if ddp.rank() == 0 else None
        )
        self.orq_2d_.codebooks_, self.orq_3d_.codebooks_ = codebooks

    def fit_grids(self, store: Mapping[int, Grids], *, progress: bool = False) -> UniRCM:
        """Train on in-memory grids keyed by global sample index (under torchrun: this rank's share only)."""
        kept = sorted({i for part in ddp.all_gather_objects(sorted(store)) for i in part})
        if not kept:
            raise ValueError("no usable training sample (all were reported as bad)")
        shapes = [s for s in ddp.all_gather_objects(self._channels(store)) if s is not None]
        self._build_networks(*shapes[0])
        self.feature_mean_squares_ = feature_mean_squares(store)
        self.mse_scale_ = mse_scales(self.feature_mean_squares_, self.config.mse_normalization, self.config.mse_weight)
        self.loss_history_ = self._train(store, kept, self.config.epochs, self.config.seed, progress)
        self.orq_2d_: ResidualQuantizer | None = None
        self.orq_3d_: ResidualQuantizer | None = None
        if self.config.use_orq:
            self.orq_2d_ = self._new_quantizer(self.config.codebook_size_2d)
            self.orq_3d_ = self._new_quantizer(self.config.codebook_size_3d)
            rows = self._foreground_rows(store)
            if rows is not None:
                self.orq_2d_.fit(rows[0].to(self.device))
                self.orq_3d_.fit(rows[1].to(self.device))
                self.orq_2d_.codebooks_ = [c.cpu() for c in self.orq_2d_.codebooks_]
                self.orq_3d_.codebooks_ = [c.cpu() for c in self.orq_3d_.codebooks_]
            self._share_quantizers()
        self.n_train_samples_ = len(kept)
        self.extensions_: list[dict[str, Any]] = []
        self.fitted_ = True
        return self

    @staticmethod
    def _channels(store: Mapping[int, Grids]) -> tuple[int, int] | None:
        first = next(iter(store.values()), None)
        return None if first is None else (int(first[0].shape[1]), int(first[1].shape[1]))

    def fit(
        self, records: Sequence[SampleRecord], *, progress: bool = False, errors: list[DataError] | None = None
    ) -> UniRCM:
        """Train the two mappings on nominal samples (of one or all categories), then fit the ORQ."""
        if not records:
            raise ValueError("UniRCM.fit needs at least one nominal training sample")
        store = self._collect(records, 0, progress, errors)
        try:
            return self.fit_grids(store, progress=progress)
        finally:
            store.close()

    def extend_grids(
        self,
        new: Mapping[int, Grids],
        replay: Mapping[int, Grids],
        *,
        epochs: int,
        codes_per_layer: Sequence[int] | None = None,
        progress: bool = False,
    ) -> UniRCM:
        """Add categories: append ORQ codes fitted on ``new`` and fine-tune the mappings on ``new`` + ``replay``.

        ``new`` and ``replay`` must use disjoint keys. Codes are *appended to every existing layer* (not a new
        codebook set), so one encoding path serves old and new categories and old residuals cannot grow. The
        default adds a quarter of each layer's original size.
        """
        self.check_fitted()
        if set(new) & set(replay):
            raise ValueError("new and replay samples need distinct indices")
        if self.orq_2d_ is not None and self.orq_3d_ is not None:
            rows = self._foreground_rows(new)
            if rows is not None:
                for quantizer, part in ((self.orq_2d_, rows[0]), (self.orq_3d_, rows[1])):
                    counts = codes_per_layer or [max(1, len(c) // 4) for c in quantizer.codebooks_]
                    quantizer.extend(part, [min(k, part.shape[0]) for k in counts])
            self._share_quantizers()
        # A view: spilled grids stay on disk. ChainMap is typed for mutable maps, but this one is only read.
        store: Mapping[int, Grids] = ChainMap(new, replay)  # type: ignore[arg-type]
        kept = sorted({i for part in ddp.all_gather_objects(sorted(store)) for i in part})
        seed = self.config.seed + len(self.extensions_) + 1
        history = self._train(store, kept, epochs, seed, progress)
        self.loss_history_ = [*self.loss_history_, *history]
        self.extensions_.append({"new_samples": len({k for k in kept if k in new}), "epochs": epochs})
        self.n_train_samples_ += self.extensions_[-1]["new_samples"]
        return self

    def extend(
        self,
        new_records: Sequence[SampleRecord],
        replay_records: Sequence[SampleRecord],
        *,
        epochs: int,
        codes_per_layer: Sequence[int] | None = None,
        progress: bool = False,
        errors: list[DataError] | None = None,
    ) -> UniRCM:
        """Add new categories to a fitted model (see :meth:`extend_grids`); replay records come from earlier ones."""
        if not new_records:
            raise ValueError("extend needs at least one record of the new categories")
        new = self._collect(new_records, 0, progress, errors)
        replay = self._collect(replay_records, len(new_records), progress, errors)
        try:
            return self.extend_grids(new, replay, epochs=epochs, codes_per_layer=codes_per_layer, progress=progress)
        finally:
            new.close()
            replay.close()

    # ------------------------------------------------------------------ inference
    def score_grids(
        self, rows_2d: torch.Tensor, rows_3d: torch.Tensor, foreground: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """G×G maps of one sample: ``combined``, ``2d``, ``3d`` and (with ORQ) ``orq_2d``, ``orq_3d``."""
        settings = self.settings
        grid = settings.grid_size
        rows_2d, rows_3d = rows_2d.float().to(self.device), rows_3d.float().to(self.device)
        mask = foreground.to(self.device)
        with torch.inference_mode():
            with autocast(self.device, settings.precision):  # the mappings only: the ORQ below stays float32
                predicted_3d, predicted_2d = self.map_to_3d_(rows_2d[None])[0], self.map_to_2d_(rows_3d[None])[0]
            distance_3d = feature_discrepancy(predicted_3d.float(), rows_3d)
            distance_2d = feature_discrepancy(predicted_2d.float(), rows_2d)
            maps = {"2d": distance_2d * mask, "3d": distance_3d * mask}
            if self.orq_2d_ is not None and self.orq_3d_ is not None:
                for name, quantizer, rows in (("orq_2d", self.orq_2d_, rows_2d), ("orq_3d", self.orq_3d_, rows_3d)):
                    scores = torch.zeros(grid * grid, device=self.device)
                    scores[mask] = quantizer.score(rows[mask])
                    maps[name] = normalize_orq_map(scores, settings.orq_normalization)
            maps["combined"] = (
                combine_scores(
                    maps["2d"],
                    maps["3d"],
                    maps.get("orq_2d"),
                    maps.get("orq_3d"),
                    float(settings.beta_2d),
                    float(settings.beta_3d),
                )
                * mask
            )
        return {name: m.view(grid, grid).cpu() for name, m in maps.items()}

    def finalize(self, combined: torch.Tensor) -> ScoredMap:
        """A G×G combined map upsampled to the input size, smoothed, and its image score.

        Default: the paper's Gaussian (``smoothing``, σ) for the map, its maximum as the score. Under ``compat``
        the official inference: the map (and the AUPRO/P-AUROC maps, with CFM's normalisations) blurred by PIL on
        a uint8 copy, the image score from the box-cascade map, max ÷ sqrt(mean of its non-zero values).
        """
        c = self.config
        if not c.compat:
            return finalize_map(combined, out_size=c.image_size, smoothing=c.smoothing, sigma=c.sigma, compat=False)
        pixels = finalize_map(combined, out_size=c.image_size, smoothing="pil_uint8", sigma=c.sigma, compat=True)
        image = finalize_map(combined, out_size=c.image_size, smoothing="box_cascade", sigma=c.sigma, compat=True)
        return ScoredMap(pixels.anomaly_map, image.score, pixels.metric_maps)

    def prepare_scoring(self) -> None:
        """Both mappings in eval mode (a loaded or freshly fitted model scores the same)."""
        self.map_to_3d_.eval()
        self.map_to_2d_.eval()

    def score(self, features: Sequence[SampleFeatures]) -> list[Scored]:
        """Anomaly map and score per sample."""
        results = []
        for sample in features:
            maps = self.score_grids(*self.grids_of(sample))
            scored = self.finalize(maps.pop("combined"))
            results.append(
                Scored(
                    score=scored.score,
                    anomaly_map=scored.anomaly_map.numpy(),
                    modality_maps={name: m.numpy() for name, m in maps.items()},
                    metric_maps={name: m.numpy() for name, m in scored.metric_maps.items()},
                )
            )
        return results

    # ------------------------------------------------------------------ persistence
    @classmethod
    def upgrade_hparams(cls, stored: dict[str, Any]) -> dict[str, Any]:
        """Files written before ``orq_normalization`` existed normalised the ORQ maps only under ``compat``."""
        hparams = dict(stored)
        if "orq_normalization" not in hparams:
            hparams["orq_normalization"] = "image_max" if hparams.get("compat") else "none"
        return hparams

    def learned_facts(self) -> dict[str, Any]:
        """Input widths, training facts, the MSE scales and the ORQ fit times."""
        facts: dict[str, Any] = {
            "channels": [self.map_to_3d_.in_features, self.map_to_2d_.in_features],
            "n_train_samples": self.n_train_samples_,
            "loss_history": self.loss_history_,
            "extensions": self.extensions_,
            "feature_mean_squares": list(self.feature_mean_squares_),
            "mse_scale": list(self.mse_scale_),
        }
        if self.orq_2d_ is not None and self.orq_3d_ is not None:
            facts["orq_fit_seconds"] = [self.orq_2d_.fit_time_, self.orq_3d_.fit_time_]
        return facts

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Both networks (``map_to_3d.``/``map_to_2d.``) and the codebooks (``orq_2d.<layer>``/``orq_3d.<layer>``)."""
        self.check_fitted()
        tensors = {
            **prefixed({k: v.cpu() for k, v in self.map_to_3d_.state_dict().items()}, "map_to_3d"),
            **prefixed({k: v.cpu() for k, v in self.map_to_2d_.state_dict().items()}, "map_to_2d"),
        }
        for name, quantizer in (("orq_2d", self.orq_2d_), ("orq_3d", self.orq_3d_)):
            if quantizer is not None:
                tensors.update({f"{name}.{layer}": book.cpu() for layer, book in enumerate(quantizer.codebooks_)})
        return tensors

    def load_state(self, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Networks and codebooks from :meth:`state_tensors` output (codebook sizes come from the tensors)."""
        self._build_networks(*config["channels"])
        load_mapping_state(self.map_to_3d_, split_prefixed(tensors, "map_to_3d"), "map_to_3d")
        load_mapping_state(self.map_to_2d_, split_prefixed(tensors, "map_to_2d"), "map_to_2d")
        self.map_to_3d_.eval()
        self.map_to_2d_.eval()
        self.orq_2d_ = self.orq_3d_ = None
        if self.config.use_orq:
            quantizers = []
            for name in ("orq_2d", "orq_3d"):
                books = split_prefixed(tensors, name)
                if not books:
                    raise ModelFileError(f"the model file has no {name} codebooks although use_orq is set")
                quantizer = self._new_quantizer(1)
                quantizer.codebooks_ = [books[str(layer)] for layer in range(len(books))]
                quantizer.codebook_sizes = [len(b) for b in quantizer.codebooks_]
                quantizers.append(quantizer)
            self.orq_2d_, self.orq_3d_ = quantizers
        self.loss_history_ = list(config.get("loss_history", []))
        self.extensions_ = list(config.get("extensions", []))
        self.n_train_samples_ = int(config.get("n_train_samples", 0))
        self.feature_mean_squares_ = tuple(config.get("feature_mean_squares", (1.0, 1.0)))
        self.mse_scale_ = tuple(config.get("mse_scale", (1.0, 1.0)))

    def export_scorer(self, out_dir: Any) -> dict[str, Any]:
        """``scorer.onnx`` with the same contract as CFM's (see :mod:`.export`)."""
        from mmiad.methods.unircm.export import export_unircm_scorer

        return export_unircm_scorer(self, out_dir)
