"""CMDR-IAD: cross-modal mapping and dual-branch reconstruction (Daci et al., arXiv 2603.03939, 2026).

Four networks learn nominal features without a memory bank: two MLPs map 2D↔3D features (as CFM, deeper) and two
decoders reconstruct each modality (Decoder2D with chunked attention and convolutions, Decoder3D along the token
axis). At test time the mapping errors are fused by a reliability gate, the reconstruction errors by confidence
weights, and their product is the anomaly map. Specification: the fact sheet of the official code (3d201cd); see
this package's README for defaults, deviations and what is inferred.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mmiad.data.errors import DataError
from mmiad.data.sample import SampleRecord
from mmiad.features.pipeline import SampleFeatures
from mmiad.methods.base import AnomalyModel, Scored
from mmiad.methods.cfm.mapping import feature_discrepancy
from mmiad.methods.cmdr import scoring
from mmiad.methods.cmdr.networks import build_networks
from mmiad.methods.cmdr.training import NETWORKS_OF, plan_training, predictions, train_step
from mmiad.methods.modelfile import ModelFileError, prefixed, split_prefixed
from mmiad.methods.registry import register_method
from mmiad.methods.settings import MethodSettings
from mmiad.utils.compute import autocast
from mmiad.utils.threads import single_thread_on_cpu

MODALITIES = tuple(NETWORKS_OF)
#: The official ``train.py`` epochs, on every device.
OFFICIAL_EPOCHS = 50
#: The CPU grid when ``grid_size`` is left unset: a one-threaded step of the weight-free widths takes ~0.25 s at
#: grid 56, so the official 50 epochs on the synthetic ``demo`` data train in ~23 min on 2 cores (BENCHMARKS.md);
#: at the official 224 with DINO/Point-MAE widths a step took 83 s on one thread (32× grid 56).
CPU_GRID = 56


@dataclass
class CMDRConfig(MethodSettings):
    """CMDR-IAD hyperparameters (the official code's defaults; the pipeline fields are
    :class:`~mmiad.methods.settings.MethodSettings`').

    Attributes:
        modality: ``both`` (the official 2D+3D method), ``xyz`` (the Decoder3D branch alone, as the official 3D-only
            script) or ``rgb`` (the Decoder2D branch alone; inferred, see the README).
        grid_size: Side of the token grid the networks run on (a multiple of 8). None: ``image_size`` (official
            224) on an accelerator, 56 on the CPU (maps are upsampled to ``image_size`` before scoring).
        epochs: Training epochs. None: the official 50 (on every device; 10 on the CPU before 2026-12-07).
        learning_rate: Adam's learning rate, one Adam per network (official 1e-3).
        seed: Seed of the initialisation, the epoch shuffles and the dropout draws (official 115).
        memory_budget_gb: Memory training may use, in GiB (None: 80 % of what the device has). The one-sample step
            is checked first (the preflight); training features stay in memory within what it leaves.

    Batch size is the official 1 (Decoder2D's BatchNorm statistics are one sample's); it is not an option.
    """

    modality: str = "both"
    grid_size: int | None = None
    epochs: int | None = None
    learning_rate: float = 1e-3
    seed: int = 115
    memory_budget_gb: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.modality not in MODALITIES:
            raise ValueError(f"unknown modality {self.modality!r}; expected one of {MODALITIES}")
        if self.grid_size is not None and (
            self.grid_size < 8 or self.grid_size % 8 or self.grid_size > self.image_size
        ):
            raise ValueError(f"grid_size must be a multiple of 8 in [8, image_size], got {self.grid_size}")
        if self.epochs is not None and self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        if self.learning_rate <= 0 or (self.memory_budget_gb is not None and self.memory_budget_gb < 0):
            raise ValueError("need learning_rate > 0 and memory_budget_gb >= 0")


@register_method("cmdr")
class CMDR(AnomalyModel):
    """Cross-modal mapping + dual-branch reconstruction (CMDR-IAD).

    Hyperparameters: :class:`CMDRConfig`. Learned state: ``networks_`` (by official name: ``map2Dto3D``,
    ``map3Dto2D``, ``Dec2D``, ``Dec3D``; only the modality's), ``grid_`` and ``channels_`` (their sizes),
    ``loss_history_`` (per network, per epoch).
    """

    config_class = CMDRConfig
    tiny_hparams: ClassVar[dict[str, Any]] = {"image_size": 64, "grid_size": 16, "epochs": 2}
    importable: ClassVar[bool] = True
    config: CMDRConfig

    # ------------------------------------------------------------------ sizes
    @property
    def _on_cpu(self) -> bool:
        return self.device.type == "cpu"

    def resolved_grid(self) -> int:
        """The grid in effect: the set one, else ``image_size`` on an accelerator and 56 on the CPU."""
        if self.config.grid_size is not None:
            return self.config.grid_size
        largest = self.config.image_size // 8 * 8  # Decoder3D needs a side divisible by 8
        return min(CPU_GRID, largest) if self._on_cpu else largest

    def resolved_epochs(self) -> int:
        """The epochs in effect: the set number, else the official 50."""
        return OFFICIAL_EPOCHS if self.config.epochs is None else self.config.epochs

    def _new_networks(self, channels: tuple[int, int], grid: int) -> None:
        """The modality's networks, built on the CPU from the current RNG state and moved to the device."""
        names = NETWORKS_OF[self.config.modality]
        self.networks_: dict[str, nn.Module] = {
            k: v.to(self.device) for k, v in build_networks(*channels, grid).items() if k in names
        }
        self.grid_, self.channels_ = grid, channels

    def _tokens(self, features: SampleFeatures) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, C2) and (N, C3) tokens in raster order and the (N,) 3D-feature foreground, on the device."""
        grid_2d, grid_3d, foreground = features.on_grid(self.grid_, self.device)
        return grid_2d.flatten(1).T.contiguous(), grid_3d.flatten(1).T.contiguous(), foreground.flatten()

    # ------------------------------------------------------------------ training
    def fit(
        self, records: Sequence[SampleRecord], *, progress: bool = False, errors: list[DataError] | None = None
    ) -> CMDR:
        """Train the modality's networks, each on its own loss with its own Adam, one sample per step.

        Features come from the feature cache (the official code re-extracts them every epoch, with a random FPS
        start and DropPath; see the README). The samples' tokens stay on the device within what the planned step
        leaves of the budget, else they are re-read from the cache at every step. On the CPU a step runs on one
        thread (:mod:`mmiad.utils.threads`): at the CPU default grid its operations are small, and on the shared
        2-core machine a step took 1.1 s on one thread against 7-15 s on two (BENCHMARKS.md).
        """
        if not records:
            raise ValueError("CMDR.fit needs at least one nominal training sample")
        c = self.config
        pipeline = self.pipeline
        channels = (int(pipeline.image_extractor.out_channels), int(pipeline.point_extractor.out_channels))
        torch.manual_seed(c.seed)
        self._new_networks(channels, self.resolved_grid())
        plan = plan_training(self.networks_, channels, self.grid_, c.memory_budget_gb)
        prepared = pipeline.preprocess(records, progress=progress, errors=errors)
        stored: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        kept: list[SampleRecord] = []
        used, keep_in_memory = 0, True
        for record, features in pipeline.iter_features(prepared, progress=progress, errors=errors):
            kept.append(record)
            if keep_in_memory:
                tokens = self._tokens(features)
                used += sum(t.numel() * t.element_size() for t in tokens)
                stored.append(tokens)
                keep_in_memory = used <= plan.spare_bytes
                if not keep_in_memory:
                    stored.clear()
        if not kept:
            raise ValueError("no usable training sample (all were reported as bad)")
        optimizers = {k: torch.optim.Adam(v.parameters(), lr=c.learning_rate) for k, v in self.networks_.items()}
        for network in self.networks_.values():
            network.train()
        torch.manual_seed(c.seed)  # the dropout draws, the same whether the features were extracted or cached
        order_generator = torch.Generator().manual_seed(c.seed)
        self.loss_history_: dict[str, list[float]] = {k: [] for k in self.networks_}
        self.skipped_steps_ = 0
        bar = tqdm(range(self.resolved_epochs()), desc="train cmdr", disable=not progress, leave=False)
        for _ in bar:
            epoch: dict[str, list[float]] = {k: [] for k in self.networks_}
            for index in torch.randperm(len(kept), generator=order_generator).tolist():
                tokens_2d, tokens_3d, foreground = (
                    stored[index] if stored else self._tokens(pipeline.extract(kept[index]))
                )
                with single_thread_on_cpu(self.device):
                    losses = train_step(self.networks_, optimizers, tokens_2d, tokens_3d, foreground, c.precision)
                self.skipped_steps_ += len(self.networks_) - len(losses)
                for name, value in losses.items():
                    epoch[name].append(value)
            for name, values in epoch.items():
                self.loss_history_[name].append(float(np.mean(values)) if values else float("nan"))
            bar.set_postfix({k: f"{v[-1]:.3f}" for k, v in self.loss_history_.items()})
        self.n_train_samples_ = len(kept)
        self.fitted_ = True
        return self

    # ------------------------------------------------------------------ inference
    def prepare_scoring(self) -> None:
        """Every network in eval mode (dropout off, BatchNorm's running statistics), as the official inference."""
        for network in self.networks_.values():
            network.eval()

    def discrepancies(self, features: SampleFeatures) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The per-network distance maps at ``image_size`` (zero on the background) and the foreground there.

        Maps computed on a coarser grid are upsampled bilinearly and re-masked with the foreground at
        ``image_size``, so every later step runs at the official resolution with the official kernel sizes.
        """
        tokens_2d, tokens_3d, foreground = self._tokens(features)
        grid, size = self.grid_, self.config.image_size
        with torch.inference_mode():
            with autocast(self.device, self.config.precision):
                pairs = predictions(self.networks_, tokens_2d, tokens_3d, foreground)
            maps = {}
            for name, (predicted, target) in pairs.items():
                flat = torch.zeros(grid * grid, device=self.device)
                flat[foreground] = feature_discrepancy(predicted.float(), target.float())
                maps[name] = flat.view(grid, grid).cpu()
        if grid == size:
            return maps, foreground.view(grid, grid).cpu()
        mask = features.points.foreground(size).cpu()
        upsampled = {
            k: F.interpolate(v[None, None], size=(size, size), mode="bilinear", align_corners=False)[0, 0] * mask
            for k, v in maps.items()
        }
        return upsampled, mask

    def score(self, features: Sequence[SampleFeatures]) -> list[Scored]:
        """Anomaly map and image score per sample (see :mod:`mmiad.methods.cmdr.scoring`); one thread on the CPU,
        as training (measured on the shared 2-core machine: 1.8 s per sample against 9 s on two threads)."""
        results = []
        for sample in features:
            with single_thread_on_cpu(self.device):
                maps, foreground = self.discrepancies(sample)
                scored = self._scored(maps, foreground)
            named = {"map3Dto2D": "map_2d", "map2Dto3D": "map_3d", "Dec2D": "2d", "Dec3D": "3d"}
            results.append(
                Scored(
                    score=scored.score,
                    anomaly_map=scored.anomaly_map.numpy(),
                    modality_maps={named[k]: v.numpy() for k, v in maps.items()},
                    metric_maps={k: v.numpy() for k, v in scored.metric_maps.items()},
                )
            )
        return results

    def _scored(self, maps: dict[str, torch.Tensor], foreground: torch.Tensor) -> scoring.ScoredMap:
        """The modality's map and score from the distance maps at ``image_size``."""
        if self.config.modality == "xyz":
            return scoring.xyz_only(maps["Dec3D"])
        if self.config.modality == "rgb":
            return scoring.finalize(scoring.rgb_only_map(maps["Dec2D"], foreground))
        psi = scoring.fused_map(maps["map3Dto2D"], maps["map2Dto3D"], maps["Dec2D"], maps["Dec3D"], foreground)
        return scoring.finalize(psi)

    # ------------------------------------------------------------------ persistence
    def learned_facts(self) -> dict[str, Any]:
        """Grid and feature widths (the networks' sizes) and the training facts."""
        return {
            "grid_size": self.grid_,
            "channels": list(self.channels_),
            "n_train_samples": self.n_train_samples_,
            "loss_history": self.loss_history_,
            "skipped_steps": self.skipped_steps_,
        }

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Each network's state dict under its official name (``Dec3D.projection.0.weight``...)."""
        self.check_fitted()
        tensors: dict[str, torch.Tensor] = {}
        for name, network in self.networks_.items():
            tensors.update(prefixed({k: v.detach().cpu() for k, v in network.state_dict().items()}, name))
        return tensors

    def load_state(self, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """The networks, sized from the stored grid and widths, on the device."""
        channels = config["channels"]
        if not isinstance(channels, list) or len(channels) != 2:
            raise ModelFileError("the cmdr model file has no [2D, 3D] 'channels'")
        # Imported official files give the grid as the ``grid_size`` hyperparameter; trained models store it.
        self._new_networks((int(channels[0]), int(channels[1])), int(config.get("grid_size") or self.resolved_grid()))
        for name, network in self.networks_.items():
            network.load_state_dict(split_prefixed(tensors, name))
        self.loss_history_ = dict(config.get("loss_history", {}))
        self.n_train_samples_ = int(config.get("n_train_samples", 0))
        self.skipped_steps_ = int(config.get("skipped_steps", 0))
