"""GLFM: global-local feature matching for multi-class point-cloud anomaly detection (Cheng et al., TASE 2025).

One model serves every class without labels. Stage I adapts Point-MAE to industrial clouds by segmenting
synthetic stretch anomalies (:mod:`~mmiad.methods.glfm.adapt`); Stage II keeps K class prototypes and one local
memory per prototype (:mod:`~mmiad.methods.glfm.banks`); Stage III routes a test cloud to its nearest prototype
and scores each local feature by its 1-NN distance to that memory. The point cloud is the only input: the
default extractors (``glfm``) run no 2D backbone.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from mmiad.data.errors import DataError
from mmiad.data.sample import SampleRecord
from mmiad.features.base import PointFeatures, feature_points
from mmiad.features.pipeline import FeaturePipeline, SampleFeatures
from mmiad.features.pointmae import POINTMAE_PRESETS, PointMaeEncoder, PointMaeExtractor, load_pointmae_weights
from mmiad.methods.base import AnomalyModel, Scored
from mmiad.methods.glfm import adapt as stage_one
from mmiad.methods.glfm import banks
from mmiad.methods.hparams import require
from mmiad.methods.memorybank.bank import PatchStore, spill_folder
from mmiad.methods.memorybank.knn import NearestNeighbors
from mmiad.methods.modelfile import ModelFileError, prefixed, split_prefixed
from mmiad.methods.registry import register_method
from mmiad.methods.settings import MethodSettings
from mmiad.postprocess.smoothing import smooth_maps
from mmiad.utils.budget import GIB

ADAPTATIONS = ("train", "none", "released")
SMOOTHINGS = ("gaussian", "pil_uint8")


@dataclass
class GLFMConfig(MethodSettings):
    """GLFM hyperparameters (the official code's: ``run.sh`` multi-class, ``train.py``).

    Attributes:
        extractors: ``glfm`` (no 2D, Point-MAE blocks 0+1) by default; any ``IMAGE+POINT`` pair works, the image
            side is ignored. Point-MAE extractors run in eval mode with the two-step smoothing (``point_options``
            ``batchnorm="running"``, ``regroup=True`` unless set otherwise).
        profile: Offline preprocessing: the official code expects background-removed clouds (M3DM's).
        num_group: FPS centres per cloud for Point-MAE extractors (None: the preset's, 1024 as the official code).
        group_size: Points per group for Point-MAE extractors (None: the preset's, 128).
        prototypes: K, the size of the global memory (10 for MVTec 3D-AD multi-class; 1 gives one PatchCore bank).
        coreset_fraction: Share of each local memory kept by the greedy coreset (0.1).
        coreset_eps: Johnson-Lindenstrauss distortion of the coreset's random projection (0.9).
        seed: Seed of the coreset projections and of Stage I (the official code seeds nothing).
        adaptation: ``train`` (Stage I from the Point-MAE pre-training weights, as ``train.py``), ``released``
            (the released ``pointmae_adapted.pth``: ``adapted_checkpoint``, else the weights folder's) or ``none``
            (plain Point-MAE). The adapted weights are stored in the model file.
        adapted_checkpoint: Path of the released adapted checkpoint (``mmiad import --method glfm --from``).
            Weight-free point extractors (FPFH) have nothing to adapt: Stage I is skipped for them.
        adapt_epochs: Stage I epochs (100 planned; the released script crashes at 40, see the README).
        adapt_steps: Clouds (= optimiser steps) per Stage I epoch (100).
        adapt_lr: Adam learning rate of Stage I (1e-4).
        unit_m: Metres per coordinate unit, for the synthesis' displacement (1: MVTec 3D-AD and mmiad's synthetic
            data; 10: Eyecandies as mmiad reads it).
        smoothing: ``gaussian`` (float blur, σ = ``sigma``) or ``pil_uint8`` (the official 8-bit PIL blur; the
            default under ``compat``).
        sigma: Blur σ in input pixels (4).
        store_float16: Keep the local features in float16 until the coreset (half the memory of the official
            float32; the kept rows are then float16-rounded).
        memory_budget_gb: RAM for the training clouds' local features before the coreset; past it they spill to
            ``.npy`` files (under ``cache_dir/spill``, else the temporary folder) and are memory-mapped, as the
            memory-bank methods' patches. The coreset's float16 projection of every row stays in memory (see the
            README for the sizes).
        extend_prototypes: Prototypes added when categories are added to a trained model; None: K scaled by the
            share of new clouds (at least 1).
    """

    extractors: str = "glfm"
    profile: str = "m3dm"
    num_group: int | None = None
    group_size: int | None = None
    prototypes: int = 10
    coreset_fraction: float = 0.1
    coreset_eps: float = 0.9
    seed: int = 0
    adaptation: str = "train"
    adapted_checkpoint: str | None = None
    adapt_epochs: int = 100
    adapt_steps: int = 100
    adapt_lr: float = 1e-4
    unit_m: float = 1.0
    smoothing: str = "gaussian"
    sigma: float = 4.0
    store_float16: bool = False
    memory_budget_gb: float = 4.0
    extend_prototypes: int | None = None

    paper_extractors: ClassVar[str] = "glfm"

    def compat_values(self) -> dict[str, Any]:
        """The official code blurs an 8-bit copy of the map (PIL)."""
        return {"smoothing": "pil_uint8"}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.adaptation not in ADAPTATIONS:
            raise ValueError(f"unknown adaptation {self.adaptation!r}; expected one of {ADAPTATIONS}")
        if self.smoothing not in SMOOTHINGS:
            raise ValueError(f"unknown smoothing {self.smoothing!r}; expected one of {SMOOTHINGS}")
        if self.prototypes < 1 or not 0 < self.coreset_fraction <= 1 or not 0 < self.coreset_eps < 1:
            raise ValueError("need prototypes >= 1, coreset_fraction in (0, 1] and coreset_eps in (0, 1)")
        if self.adapt_epochs < 0 or self.adapt_steps < 1 or self.adapt_lr <= 0 or self.unit_m <= 0:
            raise ValueError("need adapt_epochs >= 0, adapt_steps >= 1, adapt_lr > 0 and unit_m > 0")
        if any(v is not None and v < 1 for v in (self.num_group, self.group_size)):
            raise ValueError("need num_group >= 1 and group_size >= 1")
        if self.sigma < 0 or (self.extend_prototypes is not None and self.extend_prototypes < 0):
            raise ValueError("need sigma >= 0 and extend_prototypes >= 0")
        require(self.memory_budget_gb >= 0, "memory_budget_gb", self.memory_budget_gb, "must be at least 0")


def _adapted_extractor(
    preset: str, options: dict[str, Any], state: dict[str, torch.Tensor] | None, released: str | Path | None
) -> PointMaeExtractor:
    """A Point-MAE extractor holding adapted weights: a stored state, or the released file (loaded strictly).

    It starts from random weights that the strict load then replaces in full, so neither the pre-training file
    nor (for a stored state) the released file is needed.
    """
    from mmiad.features.weights import build_point_extractor

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*RANDOM weights")
        extractor = build_point_extractor(preset, random_init=True, **options)
    if state is None:
        assert released is not None
        load_pointmae_weights(extractor.model, released)
        state = extractor.model.state_dict()
    stage_one.install(extractor, state)
    return extractor


@register_method("glfm")
class GLFM(AnomalyModel):
    """Global-local feature matching (point cloud only, one model for every class).

    Learned state: ``prototypes_`` (K×C global features), ``banks_`` (one local memory per prototype),
    ``adapted_`` (the Stage-I encoder weights the extractor uses, or None).
    """

    config_class = GLFMConfig
    modalities: ClassVar[tuple[str, ...]] = ("3d",)
    unified: ClassVar[bool] = True
    tiny_hparams: ClassVar[dict[str, Any]] = {
        "image_size": 64,
        "random_init": True,
        "num_group": 16,
        "group_size": 16,
        "prototypes": 2,
        "adapt_epochs": 1,
        "adapt_steps": 1,
    }
    config: GLFMConfig
    importable = True
    _trained_pipeline: dict[str, Any] | None = None
    _stored_adapted: dict[str, torch.Tensor] | None = None  # set by load_state before the pipeline is built
    _searchers: list[NearestNeighbors | None] | None = None

    # ------------------------------------------------------------------ pipeline
    @property
    def pipeline(self) -> FeaturePipeline:
        """The shared pipeline with GLFM's Point-MAE options and, when there are any, the adapted weights (a loaded
        model's, or the released file's under ``adaptation="released"``)."""
        if getattr(self, "_pipeline", None) is None:
            from mmiad.features.registry import build_pipeline, parse_extractors

            c = self.config
            options = dict(c.point_options or {})
            image, point = parse_extractors(c.extractors)
            if point in POINTMAE_PRESETS:
                sizes = {"num_group": c.num_group, "group_size": c.group_size}
                sizes = {k: v for k, v in sizes.items() if v is not None}
                options = {"batchnorm": "running", "regroup": True, **sizes, **options}
            stored = self._stored_adapted
            released = c.adaptation == "released" and point in POINTMAE_PRESETS and stored is None
            path = None
            if released:  # fails first, naming the file, when it is absent
                from mmiad.features.weights import resolve_weights

                path = (
                    Path(c.adapted_checkpoint)
                    if c.adapted_checkpoint
                    else resolve_weights("glfm_adapted", c.weights_dir)
                )
                if not path.is_file():
                    raise DataError(path, "GLFM's adapted checkpoint (pointmae_adapted.pth) not found")
            custom = (released or stored is not None) and point in POINTMAE_PRESETS
            pipeline = build_pipeline(
                f"{image}+fpfh" if custom else c.extractors,  # adapted weights: the point extractor is built below
                profile=self.preprocess_profile(),
                image_size=c.image_size,
                weights_dir=c.weights_dir,
                random_init=c.random_init,
                cache_dir=getattr(self, "cache_dir", None),
                point_options=None if custom else options,
                device=c.device,
                precision=c.precision,
            )
            if custom:
                pipeline.point_extractor = _adapted_extractor(point, options, stored, path)
            self._pipeline = pipeline
        assert self._pipeline is not None
        return self._pipeline

    @property
    def _adaptable(self) -> PointMaeExtractor | None:
        """The Point-MAE extractor Stage I adapts, or None (weight-free extractors, or adaptation off)."""
        extractor = self.pipeline.point_extractor
        if self.config.adaptation != "train" or not isinstance(extractor, PointMaeExtractor):
            return None
        return extractor

    def _base_encoder(self, extractor: PointMaeExtractor) -> PointMaeEncoder:
        """The full pre-trained Point-MAE Stage I starts from (random, seeded, under ``random_init``)."""
        from mmiad.features.weights import build_point_extractor

        full = build_point_extractor(
            "pointmae", weights_dir=self.config.weights_dir, random_init=self.config.random_init
        )
        return stage_one.trainable_copy(extractor, full.model)

    def _cloud_loader(self, record: SampleRecord) -> Any:
        """A loader of the record's valid points (all three coordinates non-zero), as Stage I reads them."""

        def load() -> np.ndarray:
            inputs = self.pipeline.load_inputs(record)
            rule = getattr(self.pipeline.point_extractor, "nonzero", "all")
            keep = feature_points(inputs.xyz, inputs.valid, rule).reshape(-1)
            return np.asarray(inputs.xyz.reshape(-1, 3)[keep], dtype=np.float32)

        return load

    # ------------------------------------------------------------------ training
    def fit(
        self, records: Sequence[SampleRecord], *, progress: bool = False, errors: list[DataError] | None = None
    ) -> GLFM:
        """Stage I (adaptation), then the prototypes and local memories from every record's local features."""
        if not records:
            raise ValueError("GLFM.fit needs at least one nominal training sample")
        c = self.settings
        started = time.perf_counter()
        prepared = self.pipeline.preprocess(records, progress=progress, errors=errors)
        self.adapted_: dict[str, torch.Tensor] | None = None
        self.adapt_history_: list[float] = []
        point = self.pipeline.point_extractor
        if c.adaptation == "released" and isinstance(point, PointMaeExtractor):  # carried by the model file
            self.adapted_ = {k: v.detach().cpu().clone() for k, v in point.model.state_dict().items()}
        extractor = self._adaptable
        if extractor is not None and c.adapt_epochs > 0 and prepared:
            result = stage_one.adapt(
                self._base_encoder(extractor),
                [self._cloud_loader(r) for r in prepared],
                num_group=extractor.preset.num_group,
                group_size=extractor.preset.group_size,
                epochs=c.adapt_epochs,
                steps_per_epoch=c.adapt_steps,
                learning_rate=c.adapt_lr,
                seed=c.seed,
                unit_m=c.unit_m,
                device=self.device,
                progress=progress,
            )
            self.adapted_ = stage_one.inference_state(extractor, result.state)
            stage_one.install(extractor, self.adapted_)
            self.adapt_history_ = result.loss_history
        adapted = time.perf_counter()
        store, globals_ = self._local_features(prepared, progress, errors)
        try:
            if not globals_:
                raise ValueError("no usable training sample (all were reported as bad)")
            picked = banks.select_prototypes(
                torch.stack(globals_), c.prototypes, eps=c.coreset_eps, seed=c.seed, device=self.device
            )
            self.prototypes_ = torch.stack(globals_)[picked]
            self.banks_ = self._grown_banks([], store.chunks, globals_, seed_offset=0)
        finally:
            store.close()
        self.n_train_samples_ = len(globals_)
        self.extensions_: list[dict[str, Any]] = []
        self.stage_seconds_ = {
            "preprocess_and_stage_one": adapted - started,
            "features_and_memories": time.perf_counter() - adapted,
        }
        self.fitted_ = True
        return self

    def _local_features(
        self, prepared: Sequence[SampleRecord], progress: bool, errors: list[DataError] | None
    ) -> tuple[PatchStore, list[torch.Tensor]]:
        """Each usable record's local features (one block each, float16 when ``store_float16``, spilled to disk
        past ``memory_budget_gb``) and its global feature. The caller closes the store (deleting spill files)."""
        c = self.config
        spill = spill_folder(self.cache_dir)
        dtype = torch.float16 if c.store_float16 else torch.float32
        locals_ = PatchStore(c.memory_budget_gb * GIB, spill, dtype)
        globals_ = []
        for record, features in self.pipeline.iter_features(prepared, progress=progress, errors=errors):
            local = features.points.features
            if local.shape[0] == 0:
                found = DataError(record.xyz_path, "no valid point in the cloud; GLFM reads the point cloud only")
                if errors is None:
                    raise found
                errors.append(found)
                continue
            locals_.append(local)
            globals_.append(banks.global_feature(local))
        return locals_, globals_

    def _grown_banks(
        self, old: list[torch.Tensor], locals_: Sequence[banks.Chunk], globals_: list[torch.Tensor], seed_offset: int
    ) -> list[torch.Tensor]:
        """Route clouds to the prototypes and append each memory's coreset of them to its old rows (if any)."""
        c = self.settings
        owners = banks.route(torch.stack(globals_), self.prototypes_).tolist()
        grown = []
        for index in range(self.prototypes_.shape[0]):
            chunks = [local for local, owner in zip(locals_, owners, strict=True) if owner == index]
            parts = [old[index]] if index < len(old) else []
            if chunks:
                seed = c.seed + seed_offset + index + 1
                parts.append(
                    banks.coreset_bank(chunks, c.coreset_fraction, eps=c.coreset_eps, seed=seed, device=self.device)
                )
            grown.append(torch.cat(parts) if parts else torch.zeros(0, locals_[0].shape[1]))
        return grown

    def extend(
        self,
        new: Sequence[SampleRecord],
        replay: Sequence[SampleRecord],
        *,
        epochs: int = 0,
        progress: bool = False,
        errors: list[DataError] | None = None,
    ) -> GLFM:
        """Add categories without revisiting the old ones (``mmiad train --resume RUN --add-categories``).

        The extractor stays as adapted (so the old memories stay valid), ``extend_prototypes`` prototypes are added
        farthest-first among the new clouds, the new clouds are routed to all prototypes, and each memory appends
        the coreset of its new rows. ``replay`` and ``epochs`` are not used: GLFM keeps every old memory as is.
        """
        self.check_fitted()
        prepared = self.pipeline.preprocess(new, progress=progress, errors=errors)
        store, globals_ = self._local_features(prepared, progress, errors)
        try:
            if not globals_:
                raise ValueError("no usable sample among the new categories")
            c = self.settings
            added = c.extend_prototypes
            if added is None:
                added = max(1, round(c.prototypes * len(globals_) / (self.n_train_samples_ + len(globals_))))
            picked = banks.more_prototypes(self.prototypes_, torch.stack(globals_), added)
            self.prototypes_ = torch.cat([self.prototypes_, torch.stack(globals_)[picked]])
            offset = 1000 * (len(self.extensions_) + 1)
            self.banks_ = self._grown_banks(self.banks_, store.chunks, globals_, seed_offset=offset)
        finally:
            store.close()
        self.n_train_samples_ += len(globals_)
        self.extensions_.append({"new_samples": len(globals_), "prototypes_added": len(picked)})
        self._searchers = None
        return self

    # ------------------------------------------------------------------ inference
    def prepare_scoring(self) -> None:
        """One exact 1-NN searcher per non-empty local memory, on the device."""
        self._searchers = [
            NearestNeighbors(bank, device=self.device) if bank.shape[0] else None for bank in self.banks_
        ]

    def score_cloud(self, points: PointFeatures) -> tuple[torch.Tensor, int]:
        """(G,) per-centre scores of one cloud and the index of the memory it was routed to."""
        if self._searchers is None:
            self.prepare_scoring()
        assert self._searchers is not None
        local = points.features.float()
        if local.shape[0] == 0:
            raise DataError(None, "no valid point in the cloud; GLFM reads the point cloud only")
        filled = torch.tensor([s is not None for s in self._searchers])
        distances = torch.cdist(banks.global_feature(local)[None, None], self.prototypes_.float()[None])[0, 0]
        distances[~filled] = float("inf")
        owner = int(torch.argmin(distances))
        searcher = self._searchers[owner]
        assert searcher is not None
        return banks.centre_scores(local, searcher), owner

    def score(self, features: Sequence[SampleFeatures]) -> list[Scored]:
        """Route, score each centre, spread to the points (3-NN weights), put on the grid, blur, take the max."""
        c = self.settings
        results = []
        for sample in features:
            points = sample.points
            centre, _ = self.score_cloud(points)
            projected = PointFeatures(
                centre[:, None], points.pixel_index, points.neighbors, points.weights, points.grid_size
            )
            raw = projected.dense()[0]
            if raw.shape[-1] != c.image_size:
                raw = torch.nn.functional.interpolate(raw[None, None], size=(c.image_size,) * 2, mode="bilinear")[0, 0]
            smoothed = smooth_maps(raw, c.smoothing, c.sigma)
            results.append(Scored(float(smoothed.max()), smoothed.numpy(), modality_maps={"3d": raw.numpy()}))
        return results

    # ------------------------------------------------------------------ persistence
    def learned_facts(self) -> dict[str, Any]:
        """Memory sizes, whether the extractor was adapted, and the training facts."""
        return {
            "bank_rows": [int(b.shape[0]) for b in self.banks_],
            "adapted": self.adapted_ is not None,
            "adapt_history": self.adapt_history_,
            "n_train_samples": self.n_train_samples_,
            "extensions": self.extensions_,
        }

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Prototypes, every local memory, and the adapted encoder (when Stage I ran)."""
        self.check_fitted()
        tensors = {"prototypes": self.prototypes_.contiguous()}
        tensors.update({f"bank.{i}": b.contiguous() for i, b in enumerate(self.banks_)})
        if self.adapted_ is not None:
            tensors.update(prefixed(self.adapted_, "adapted"))
        return tensors

    def check_pipeline(self, trained_with: dict[str, Any] | None) -> None:
        """Deferred to :meth:`load_state`: the adapted weights must be installed before the configs compare."""
        self._trained_pipeline = trained_with

    def load_state(self, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Install the adapted weights (if any), check the pipeline, and restore prototypes and memories."""
        self.adapted_ = split_prefixed(tensors, "adapted") if config.get("adapted") else None
        if self.adapted_ is not None:
            self._stored_adapted, self._pipeline = self.adapted_, None  # the pipeline is built around them
            if not isinstance(self.pipeline.point_extractor, PointMaeExtractor):
                raise ModelFileError(
                    "the model file holds adapted Point-MAE weights but the extractor is not Point-MAE"
                )
        super().check_pipeline(json.loads(json.dumps(self._trained_pipeline)) if self._trained_pipeline else None)
        rows = [int(r) for r in config["bank_rows"]]
        self.prototypes_ = tensors["prototypes"].float()
        self.banks_ = [tensors[f"bank.{i}"].float() for i in range(len(rows))]
        if len(self.banks_) != self.prototypes_.shape[0] or [b.shape[0] for b in self.banks_] != rows:
            raise ModelFileError("the GLFM model file's memories do not match its prototypes")
        self.adapt_history_ = [float(v) for v in config.get("adapt_history", [])]
        self.n_train_samples_ = int(config.get("n_train_samples", 0))
        self.extensions_ = list(config.get("extensions", []))
        self._searchers = None
