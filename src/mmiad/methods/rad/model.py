"""RAD: training-free anomaly detection by multi-level retrieval (Zhang et al., ICML 2026; longkukuhi/RAD).

``fit`` only stores a memory of the nominal images' tokens (no gradient step). A test image retrieves the
``k_image`` training images whose CLS tokens are nearest, then each of its patches is scored by 1 − the best
cosine with those images' patches in a small window around the same place, at four depths; the depths' scores are
averaged, upsampled, lightly blurred, and the image score is the mean of the top 1 % of the map.

Official: DINOv3 ViT-B/16 at 448², RGB only. mmiad: DINO ViT-B/8 at 224² (``--extractors dino-rad``, the same
28×28 grid), a substitution; and an optional 3D branch of mmiad's own design (``modality``), which matches the
same retrieved images' 3D features in the same window.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from mmiad.data.errors import DataError
from mmiad.data.sample import SampleRecord
from mmiad.features.pipeline import SampleFeatures
from mmiad.features.vit_tokens import split_tokens
from mmiad.methods.base import AnomalyModel, Scored
from mmiad.methods.memorybank.bank import spill_folder
from mmiad.methods.modelfile import ModelFileError
from mmiad.methods.rad.config import RADConfig
from mmiad.methods.rad.memory import RadMemory
from mmiad.methods.rad.retrieval import (
    finalize,
    global_similarity,
    layer_weights,
    normalised,
    retrieve_images,
    window_similarity,
)
from mmiad.methods.registry import register_method

#: What one sample brings: (CLS (C,), per level (P, C) tokens, 3D tokens (P, C3) or None, 3D foreground or None).
Tokens = tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None, torch.Tensor | None]


@register_method("rad")
class RAD(AnomalyModel):
    """Training-free multi-level retrieval (RAD; RGB-only officially, DINO ViT-B/8 standing in for DINOv3).

    Hyperparameters: :class:`~mmiad.methods.rad.config.RADConfig`. Learned state: ``memory_`` (the stored
    tokens), ``grid_``, ``n_train_samples_``.
    """

    config_class = RADConfig
    tiny_hparams: ClassVar[dict[str, Any]] = {"image_size": 64, "k_image": 4, "map_size": 64}
    modalities: ClassVar[tuple[str, ...]] = ("2d", "3d")  # 2d by default; 3d only with the extension
    unified = True  # one memory of every category, searched without labels (train with --unified)
    few_shot = True
    training_free = True  # fit stores the memory: `mmiad test --method rad --data D` needs no train step
    config: RADConfig

    # ------------------------------------------------------------------ features
    def _tokens(self, features: SampleFeatures) -> tuple[Tokens, tuple[int, int]]:
        """The sample's tokens and grid; a single-map extractor gives one level and its spatial mean as the CLS."""
        image = features.image.float()
        grid = (int(image.shape[1]), int(image.shape[2]))
        extractor = self.pipeline.image_extractor
        if getattr(extractor, "has_cls", False):
            layers = len(extractor.token_layers)  # type: ignore[attr-defined]
            levels, cls = split_tokens(image, layers, int(extractor.layer_channels))  # type: ignore[attr-defined]
        else:
            levels, cls = [image.reshape(image.shape[0], -1).T], image.mean(dim=(1, 2))
        points = foreground = None
        if self.config.modality != "2d":
            if grid[0] != grid[1]:
                raise DataError(None, f"the 3D branch needs a square token grid, got {grid}")
            projected = features.points.to_grid(grid[0])
            points = projected.reshape(projected.shape[0], -1).T
            foreground = features.points.foreground(grid[0]).reshape(-1)
        return (cls, levels, points, foreground), grid

    # ------------------------------------------------------------------ memory
    def fit(
        self, records: Sequence[SampleRecord], *, progress: bool = False, errors: list[DataError] | None = None
    ) -> RAD:
        """Store every nominal sample's tokens (the memory); nothing is trained."""
        if not records:
            raise ValueError("RAD.fit needs at least one nominal training sample")
        prepared = self.pipeline.preprocess(records, progress=progress, errors=errors)
        spill = spill_folder(self.cache_dir)
        memory: RadMemory | None = None
        stream = self.pipeline.iter_features(prepared, progress=progress, errors=errors, description="memory rad")
        for _, features in stream:
            (cls, levels, points, foreground), grid = self._tokens(features)
            if memory is None:
                budget = self.settings.memory_budget_gb * 2**30
                memory = RadMemory(grid, self.settings.memory_dtype, budget, spill)
                layer_weights(len(levels), self.config.layer_weights)  # fail now on a wrong count
            elif grid != memory.grid:
                raise ValueError(f"token grid {grid} differs from the memory's {memory.grid}")
            memory.add(cls, levels, points, foreground)
        if memory is None or len(memory) == 0:
            raise ValueError("no usable training sample (all were reported as bad)")
        memory.finish()
        self.memory_ = memory
        self.grid_ = memory.grid
        self.n_train_samples_ = len(memory)
        self.fitted_ = True
        return self

    # ------------------------------------------------------------------ scoring
    def centred(self, tokens_3d: bool) -> bool:
        """Whether tokens are centred by the memory's channel mean (``center``; auto: see the config)."""
        if self.settings.center is not None:
            return bool(self.settings.center)
        return tokens_3d or not getattr(self.pipeline.image_extractor, "has_cls", False)

    def _unit(self, tokens: torch.Tensor, level: int | None, device: torch.device, owned: bool = False) -> torch.Tensor:
        """Tokens (…, C) on ``device`` in float32, centred when asked for, then L2-normalised.

        ``owned`` tokens (a fresh gather from the memory: k·P·C floats, 361 MB per level for k=150) are changed in
        place instead of copied twice; a sample's own features never are.
        """
        tokens = tokens.to(device, torch.float32)
        if not owned:
            if self.centred(level is None):
                tokens = tokens - self.memory_.mean(level).to(device)
            return normalised(tokens)
        if self.centred(level is None):
            tokens.sub_(self.memory_.mean(level).to(device))
        return tokens.div_(tokens.norm(dim=-1, keepdim=True).clamp_(min=1e-12))

    def patch_scores(self, tokens: Tokens, grid: tuple[int, int]) -> dict[str, torch.Tensor]:
        """(P,) patch scores by name: ``2d`` (the levels fused), ``3d`` (extension) and ``fused``."""
        settings = self.settings
        k_image, radius = settings.retrieval()
        cls, levels, points, foreground = tokens
        device = self.device
        retrieved = retrieve_images(cls.float(), self.memory_.cls, k_image)
        out: dict[str, torch.Tensor] = {}
        if settings.modality != "3d":
            weights = layer_weights(len(levels), settings.layer_weights)
            fused = torch.zeros(grid[0] * grid[1], device=device)
            for index, (query, weight) in enumerate(zip(levels, weights, strict=True)):
                if weight == 0:
                    continue
                references = self._unit(self.memory_.gather_level(index, retrieved), index, device, owned=True)
                similarity = self._similarity(self._unit(query, index, device), references, grid, radius)
                fused += weight * (1 - similarity)
            out["2d"] = fused.cpu()
        if settings.modality != "2d":
            assert points is not None and foreground is not None
            references, valid = self.memory_.gather_points(retrieved)
            query, references = self._unit(points, None, device), self._unit(references, None, device, owned=True)
            similarity = self._similarity(query, references, grid, radius, valid.to(device))
            score_3d = (1 - similarity.clamp(min=-1.0)).cpu()  # no foreground candidate: the largest distance, 2
            out["3d"] = torch.where(foreground.cpu(), score_3d, torch.zeros_like(score_3d))
        if "2d" in out and "3d" in out:
            out["fused"] = out["2d"] * out["3d"] if settings.fusion == "product" else out["2d"] + out["3d"]
        else:
            out["fused"] = out["2d"] if "2d" in out else out["3d"]
        return out

    def _similarity(
        self,
        query: torch.Tensor,
        references: torch.Tensor,
        grid: tuple[int, int],
        radius: int,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.settings.positional:
            return window_similarity(query, references, grid, radius, valid)
        return global_similarity(query, references, valid)

    def score(self, features: Sequence[SampleFeatures]) -> list[Scored]:
        """Retrieve, match, fuse and finalise each sample (see :mod:`mmiad.methods.rad.retrieval`)."""
        settings = self.settings
        results = []
        for sample in features:
            tokens, grid = self._tokens(sample)
            if grid != self.grid_:
                raise DataError(None, f"token grid {grid} differs from the memory's {self.grid_}")
            maps = self.patch_scores(tokens, grid)
            anomaly_map, value = finalize(
                maps["fused"],
                grid,
                map_size=settings.map_size,
                out_size=settings.image_size,
                sigma=settings.sigma,
                max_ratio=settings.max_ratio,
            )
            modality_maps = {k: v.reshape(grid).numpy() for k, v in maps.items() if k != "fused"}
            results.append(Scored(score=value, anomaly_map=anomaly_map.numpy(), modality_maps=modality_maps))
        return results

    # ------------------------------------------------------------------ persistence
    def learned_facts(self) -> dict[str, Any]:
        """The grid, the levels and the memory's measured size per image."""
        return {
            "grid": list(self.grid_),
            "levels": len(self.memory_.levels),
            "n_train_samples": self.n_train_samples_,
            "memory_bytes_per_image": self.memory_.bytes_per_image(),
        }

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """``cls``, ``level.{i}`` and, with the 3D extension, ``points`` and ``foreground``."""
        self.check_fitted()
        return self.memory_.tensors()

    def load_state(self, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """The memory back from the model file, its shapes checked against the stored facts."""
        grid = tuple(int(v) for v in config["grid"])
        if len(grid) != 2:
            raise ModelFileError(f"field 'grid' must hold two sides, got {config['grid']!r}")
        try:
            memory = RadMemory.from_tensors(tensors, (grid[0], grid[1]), int(config["levels"]))
        except ValueError as error:
            raise ModelFileError(f"the rad memory does not fit: {error}") from error
        if self.config.modality != "2d" and memory.points is None:
            raise ModelFileError("the rad memory holds no 3D tokens; it was built with modality 2d")
        self.memory_ = memory
        self.grid_ = (grid[0], grid[1])
        self.n_train_samples_ = int(config.get("n_train_samples", len(memory)))
