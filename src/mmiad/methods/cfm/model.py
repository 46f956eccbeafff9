"""CFM: crossmodal feature mapping (Costanzino et al., CVPR 2024).

Two small MLPs learn, on nominal samples only, to predict each pixel's 3D feature from its 2D feature and vice
versa. At test time a defect breaks that relationship, so the discrepancy between predicted and observed features
is the anomaly score. No memory bank: the model is two MLPs, which is why CFM is fast and light.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm

from mmiad.data.errors import DataError
from mmiad.data.sample import SampleRecord
from mmiad.features.pipeline import SampleFeatures
from mmiad.methods.base import AnomalyModel, Scored
from mmiad.methods.cfm.mapping import FeatureProjectionMLP, feature_discrepancy
from mmiad.methods.cfm.scoring import AGGREGATIONS, aggregate, finalize_map
from mmiad.methods.cfm.training import accumulate_batch, plan_cfm_training, sample_pixels, subset_generator
from mmiad.methods.hparams import require
from mmiad.methods.modelfile import prefixed, split_prefixed
from mmiad.methods.registry import register_method
from mmiad.methods.settings import MethodSettings
from mmiad.utils.budget import MicroBatchPlan
from mmiad.utils.compute import autocast

MAPPINGS = ("crossmodal", "intramodal")


@dataclass
class CFMConfig(MethodSettings):
    """CFM hyperparameters (the paper's where it states them; the official code's smoothing and normalisations
    behind ``compat``).

    The pipeline fields (extractors, image size, weights, profile, device, compat) are
    :class:`~mmiad.methods.settings.MethodSettings`'.

    Attributes:
        grid_size: Side of the grid the mapping runs on; 224 as the paper, smaller is faster (maps upsampled).
        epochs: Training epochs (paper: 250 for MVTec 3D-AD).
        batch_size: Images per optimisation step (official: 4).
        learning_rate: Adam learning rate (official: 1e-3).
        seed: Seed of initialisation and shuffling (official: 115).
        aggregation: How the two directions combine: product (paper), sum, max, 2d, 3d.
        mapping: ``crossmodal`` (CFM) or ``intramodal`` (2D→2D and 3D→3D reconstruction, the Tab. 7 ablation).
        smoothing: ``gaussian`` (paper, σ=4) or ``box_cascade`` (official code; the default under ``compat``,
            which also applies the official per-metric normalisations).
        sigma: Gaussian σ in input pixels.
        memory_budget_gb: Memory training may use, in GiB (None: 80 % of the available RAM). The training step
            is planned first (a batch that does not fit is split into micro-batches with accumulated gradients);
            the training features stay in memory within what is left, else they are reloaded each epoch.
        micro_batch: Images per forward/backward pass; None: the largest that fits ``memory_budget_gb``.
        pixel_subset: Fraction in (0, 1] of each image's foreground pixels a training step uses, drawn anew at
            every step from a generator seeded by ``seed``; None (or 1) uses them all, as the official code. A
            deviation for CPU users (see the README): the step's cost falls in proportion.

    ``device`` is where training and scoring run, ``precision`` the autocast of the two MLPs (the loss, the
    discrepancies and the stored weights stay float32); maps and scores come back on the CPU.
    """

    grid_size: int = 224
    epochs: int = 250
    batch_size: int = 4
    learning_rate: float = 1e-3
    seed: int = 115
    aggregation: str = "product"
    mapping: str = "crossmodal"
    smoothing: str = "gaussian"
    sigma: float = 4.0
    memory_budget_gb: float | None = None
    micro_batch: int | None = None
    pixel_subset: float | None = None

    inference_keys = MethodSettings.inference_keys | {"aggregation", "smoothing", "sigma"}

    def compat_values(self) -> dict[str, Any]:
        """The official code smooths with the 5×5/7×7 box cascade."""
        return {"smoothing": "box_cascade"}

    def __post_init__(self) -> None:
        super().__post_init__()
        require(
            self.aggregation in AGGREGATIONS,
            "aggregation",
            self.aggregation,
            f"expected one of {', '.join(AGGREGATIONS)}",
        )
        require(self.mapping in MAPPINGS, "mapping", self.mapping, f"expected one of {', '.join(MAPPINGS)}")
        require(
            1 <= self.grid_size <= self.image_size,
            "grid_size",
            self.grid_size,
            f"must be in [1, image_size={self.image_size}]",
        )
        require(self.epochs >= 0, "epochs", self.epochs, "must be at least 0")
        require(self.batch_size >= 1, "batch_size", self.batch_size, "must be at least 1")
        require(self.learning_rate > 0, "learning_rate", self.learning_rate, "must be positive")
        require(self.sigma >= 0, "sigma", self.sigma, "must be at least 0")
        budget, micro = self.memory_budget_gb, self.micro_batch
        require(budget is None or budget >= 0, "memory_budget_gb", budget, "must be at least 0 (or null)")
        require(micro is None or micro >= 1, "micro_batch", micro, "must be at least 1 (or null)")
        subset = self.pixel_subset
        require(subset is None or 0 < subset <= 1, "pixel_subset", subset, "must be in (0, 1] (or null)")


@register_method("cfm")
class CFM(AnomalyModel):
    """Crossmodal feature mapping: two MLPs map 2D↔3D features (Costanzino et al., CVPR 2024).

    Hyperparameters: :class:`CFMConfig`. Learned state: ``map_to_3d_`` and ``map_to_2d_`` (the two MLPs),
    ``loss_history_``.
    """

    config_class = CFMConfig
    importable = True
    tiny_hparams: ClassVar[dict[str, Any]] = {"image_size": 64, "grid_size": 32, "epochs": 3, "batch_size": 2}
    config: CFMConfig

    # ------------------------------------------------------------------ training
    def _build_networks(self, channels_2d: int, channels_3d: int) -> None:
        """Fresh MLPs from the seed: initialised on the CPU and then moved, so every device starts the same."""
        torch.manual_seed(self.config.seed)
        crossmodal = self.config.mapping == "crossmodal"
        self._new_networks(*((channels_2d, channels_3d) if crossmodal else (channels_3d, channels_2d)))

    def _new_networks(self, in_3d: int, in_2d: int) -> None:
        """The two MLPs from the widths they read (the mapping fixes the widths they predict), on the device."""
        if self.config.mapping == "crossmodal":
            self.map_to_3d_ = FeatureProjectionMLP(in_3d, in_2d)
            self.map_to_2d_ = FeatureProjectionMLP(in_2d, in_3d)
        else:
            self.map_to_3d_ = FeatureProjectionMLP(in_3d, in_3d)
            self.map_to_2d_ = FeatureProjectionMLP(in_2d, in_2d)
        self.map_to_3d_.to(self.device)
        self.map_to_2d_.to(self.device)

    def _inputs_of(self, features_2d: torch.Tensor, features_3d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What each network reads: the other modality (crossmodal) or its own (intramodal)."""
        if self.config.mapping == "crossmodal":
            return features_2d, features_3d
        return features_3d, features_2d

    def _plan(self, channels_2d: int, channels_3d: int) -> MicroBatchPlan:
        """Build the networks and plan the training step within the budget (the preflight)."""
        self._build_networks(channels_2d, channels_3d)
        return self._plan_step(channels_2d, channels_3d)

    def _plan_step(self, channels_2d: int, channels_3d: int) -> MicroBatchPlan:
        """Plan the training step of the networks as they are (``extend`` trains on without rebuilding them)."""
        c = self.config
        rows = c.grid_size**2 if self._subset is None else max(1, round(self._subset * c.grid_size**2))
        return plan_cfm_training(
            self.map_to_3d_,
            self.map_to_2d_,
            self._inputs_of,
            channels=(channels_2d, channels_3d),
            rows_per_image=rows,
            batch_size=c.batch_size,
            memory_budget_gb=c.memory_budget_gb,
            micro_batch=c.micro_batch,
        )

    @property
    def _subset(self) -> float | None:
        """The ``pixel_subset`` fraction in effect (None: every pixel; 1 is the same)."""
        fraction = self.config.pixel_subset
        return fraction if fraction is not None and fraction < 1 else None

    def _foreground_rows(self, features: SampleFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        grid_2d, grid_3d, foreground = features.on_grid(self.config.grid_size, self.device)
        rows_2d = grid_2d.flatten(1).T[foreground.flatten()]
        rows_3d = grid_3d.flatten(1).T[foreground.flatten()]
        return rows_2d.contiguous(), rows_3d.contiguous()

    def fit(
        self, records: Sequence[SampleRecord], *, progress: bool = False, errors: list[DataError] | None = None
    ) -> CFM:
        """Train both mappings jointly on the foreground pixels of nominal samples."""
        if not records:
            raise ValueError("CFM.fit needs at least one nominal training sample")
        kept, rows, channels = self._collect_rows(records, self._plan, progress, errors)
        plan = self._plan(*channels)
        self.loss_history_: list[float] = self._train(kept, rows, plan, self.config.epochs, self.config.seed, progress)
        self.n_train_samples_ = len(kept)
        self.extensions_: list[dict[str, Any]] = []
        self.fitted_ = True
        return self

    def extend(
        self,
        new_records: Sequence[SampleRecord],
        replay_records: Sequence[SampleRecord],
        *,
        epochs: int,
        progress: bool = False,
        errors: list[DataError] | None = None,
    ) -> CFM:
        """Add categories to a fitted (unified) CFM: both mappings train on, from their current weights.

        Not in the CFM paper: CFM keeps no per-category state, so the only way it can learn new classes is to go on
        training its two MLPs, here on the new categories' samples plus ``replay_records`` (none under the
        incremental protocol), ``epochs`` epochs with a fresh Adam at the configured learning rate. This is the
        plain fine-tuning baseline of incremental learning (``mmiad train --resume RUN --add-categories``,
        ``python -m mmiad.bench incremental``), and what it forgets is what the protocol measures.
        """
        self.check_fitted()
        if not new_records:
            raise ValueError("extend needs at least one record of the new categories")
        kept, rows, channels = self._collect_rows([*new_records, *replay_records], self._plan_step, progress, errors)
        plan = self._plan_step(*channels)
        seed = self.config.seed + len(self.extensions_) + 1
        history = self._train(kept, rows, plan, epochs, seed, progress)
        new_categories = {r.category for r in new_records}
        added = sum(1 for r in kept if r.category in new_categories)  # kept may be preprocessed copies
        self.loss_history_ = [*self.loss_history_, *history]
        step = {"new_samples": added, "replayed_samples": len(kept) - added, "epochs": epochs}
        self.extensions_ = [*self.extensions_, step]
        self.n_train_samples_ += added
        return self

    def _collect_rows(
        self,
        records: Sequence[SampleRecord],
        plan: Callable[[int, int], MicroBatchPlan],
        progress: bool,
        errors: list[DataError] | None,
    ) -> tuple[list[SampleRecord], list[tuple[torch.Tensor, torch.Tensor]], tuple[int, int]]:
        """(usable records, their foreground rows, (2D, 3D) widths); rows stay empty when they exceed the budget.

        The rows kept between epochs live on the device, within what the planned step leaves of the budget (the
        budget is the device's), so a GPU is fed without a copy per step; ``plan`` is the preflight run on the
        first sample's widths, before the other features are extracted.
        """
        prepared = self.pipeline.preprocess(records, progress=progress, errors=errors)
        rows: list[tuple[torch.Tensor, torch.Tensor]] = []
        budget: float | None = None  # for the stored rows: what the training step leaves of the budget
        used = 0
        keep_in_memory = True
        kept_records: list[SampleRecord] = []
        for record, features in self.pipeline.iter_features(prepared, progress=progress, errors=errors):
            kept_records.append(record)
            if keep_in_memory:
                rows_2d, rows_3d = self._foreground_rows(features)
                pair = (rows_2d.to(self.device), rows_3d.to(self.device))
                if budget is None:
                    budget = plan(pair[0].shape[1], pair[1].shape[1]).spare_bytes
                used += sum(t.numel() * t.element_size() for t in pair)
                rows.append(pair)
                keep_in_memory = used <= budget
                if not keep_in_memory:
                    rows.clear()
        if not kept_records:
            raise ValueError("no usable training sample (all were reported as bad)")
        if rows:
            channels = (rows[0][0].shape[1], rows[0][1].shape[1])
        else:
            first = self._foreground_rows(self.pipeline.extract(kept_records[0]))
            channels = (first[0].shape[1], first[1].shape[1])
        return kept_records, rows, (int(channels[0]), int(channels[1]))

    def _train(
        self,
        kept_records: Sequence[SampleRecord],
        rows: Sequence[tuple[torch.Tensor, torch.Tensor]],
        plan: MicroBatchPlan,
        epochs: int,
        seed: int,
        progress: bool,
    ) -> list[float]:
        """``epochs`` epochs of both mappings on the samples (rows, or re-extracted features); the epoch losses."""
        optimizer = torch.optim.Adam(
            [*self.map_to_3d_.parameters(), *self.map_to_2d_.parameters()], lr=self.config.learning_rate
        )
        generator = torch.Generator().manual_seed(seed)
        subset = subset_generator(seed)
        history: list[float] = []
        bar = tqdm(range(epochs), desc="train cfm", disable=not progress, leave=False)
        for _ in bar:
            order = torch.randperm(len(kept_records), generator=generator).tolist()
            epoch_losses = []
            for start in range(0, len(order), self.config.batch_size):
                batch = order[start : start + self.config.batch_size]
                if rows:
                    pairs = [rows[i] for i in batch]
                else:
                    pairs = [self._foreground_rows(self.pipeline.extract(kept_records[i])) for i in batch]
                if self._subset is not None:
                    pairs = sample_pixels(pairs, self._subset, subset)
                optimizer.zero_grad()
                loss = accumulate_batch(
                    self.map_to_3d_, self.map_to_2d_, self._inputs_of, pairs, plan.micro_batch, self.config.precision
                )
                optimizer.step()
                epoch_losses.append(loss)
            history.append(float(np.mean(epoch_losses)))
            bar.set_postfix(loss=f"{history[-1]:.4f}")
        return history

    # ------------------------------------------------------------------ inference
    def score_features(self, features: SampleFeatures) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(combined, 2D-discrepancy, 3D-discrepancy) maps on the mapping grid, zero on the background.

        Only foreground pixels go through the MLPs: the background is zeroed anyway, and skipping it saves most
        of the compute on real data. The MLPs run on their device under ``precision``'s autocast; the
        discrepancies are taken in float32 and the maps returned on the CPU.
        """
        grid = self.config.grid_size
        device = next(self.map_to_3d_.parameters()).device
        grid_2d, grid_3d, foreground = features.on_grid(grid, device)
        mask = foreground.flatten()
        rows_2d = grid_2d.flatten(1).T[mask].to(device)
        rows_3d = grid_3d.flatten(1).T[mask].to(device)
        source_3d, source_2d = self._inputs_of(rows_2d, rows_3d)
        with torch.inference_mode():
            with autocast(device, self.config.precision):
                predicted_3d, predicted_2d = self.map_to_3d_(source_3d), self.map_to_2d_(source_2d)
            distance_3d = feature_discrepancy(predicted_3d.to(rows_3d.dtype), rows_3d).cpu()
            distance_2d = feature_discrepancy(predicted_2d.to(rows_2d.dtype), rows_2d).cpu()
        map_3d = torch.zeros(grid * grid)
        map_2d = torch.zeros(grid * grid)
        mask = mask.cpu()
        map_3d[mask] = distance_3d
        map_2d[mask] = distance_2d
        map_2d, map_3d = map_2d.view(grid, grid), map_3d.view(grid, grid)
        return aggregate(map_2d, map_3d, self.config.aggregation), map_2d, map_3d

    def prepare_scoring(self) -> None:
        """Both MLPs in eval mode (dropout-free anyway, but a loaded or fitted model scores the same)."""
        self.map_to_3d_.eval()
        self.map_to_2d_.eval()

    def score(self, features: Sequence[SampleFeatures]) -> list[Scored]:
        """Anomaly map and score per sample (see :mod:`mmiad.methods.cfm.scoring`)."""
        settings = self.settings
        results = []
        for sample in features:
            combined, map_2d, map_3d = self.score_features(sample)
            scored = finalize_map(
                combined,
                out_size=settings.image_size,
                smoothing=settings.smoothing,
                sigma=settings.sigma,
                compat=settings.compat,
            )
            results.append(
                Scored(
                    score=scored.score,
                    anomaly_map=scored.anomaly_map.numpy(),
                    modality_maps={"2d": map_2d.numpy(), "3d": map_3d.numpy()},
                    metric_maps={name: m.numpy() for name, m in scored.metric_maps.items()},
                )
            )
        return results

    # ------------------------------------------------------------------ persistence
    def learned_facts(self) -> dict[str, Any]:
        """Input widths of both MLPs and the training facts."""
        return {
            "channels": [self.map_to_3d_.input.in_features, self.map_to_2d_.input.in_features],
            "n_train_samples": self.n_train_samples_,
            "loss_history": self.loss_history_,
            **({"extensions": self.extensions_} if self.extensions_ else {}),
        }

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Both MLPs' weights, under ``map_to_3d.`` and ``map_to_2d.``."""
        self.check_fitted()
        return {
            **prefixed({k: v.cpu() for k, v in self.map_to_3d_.state_dict().items()}, "map_to_3d"),
            **prefixed({k: v.cpu() for k, v in self.map_to_2d_.state_dict().items()}, "map_to_2d"),
        }

    def load_state(self, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Both MLPs, sized from the stored input widths (the output widths follow from the mapping), on the device."""
        self._new_networks(*(int(c) for c in config["channels"]))
        self.map_to_3d_.load_state_dict(split_prefixed(tensors, "map_to_3d"))
        self.map_to_2d_.load_state_dict(split_prefixed(tensors, "map_to_2d"))
        self.loss_history_ = list(config.get("loss_history", []))
        self.n_train_samples_ = int(config.get("n_train_samples", 0))
        self.extensions_ = list(config.get("extensions", []))

    def export_scorer(self, out_dir: Any) -> dict[str, Any]:
        """``scorer.onnx``: grid_2d, grid_3d, foreground → anomaly_map, map_2d, map_3d, score."""
        from mmiad.methods.cfm.export import export_cfm_scorer

        return export_cfm_scorer(self, out_dir)
