"""CIF: "Commonality In Few" (AAAI 2026, Sunny5250/CIF), few-shot multimodal anomaly detection with hypergraphs.

A handful of nominal images is enough because CIF stores structure, not just patches: each shot's foreground RGB
patches are clustered into semantic hyperedges, the shots' clusters are aligned, and the memory keeps a coreset
of every cluster. At test time the test image gets its own hyperedges, one training-free message-passing step over
test + memory nodes, and each patch is scored against the memory clusters that match its hyperedge and against
the whole memory. RGB and XYZ are scored separately (XYZ reuses the RGB hyperedges) and multiplied. Nothing is
trained: ``fit`` only builds the memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from mmiad.data.errors import DataError
from mmiad.data.sample import SampleRecord
from mmiad.features.pipeline import SampleFeatures
from mmiad.methods.base import AnomalyModel, Scored
from mmiad.methods.cif.config import CIFConfig, clusters_for
from mmiad.methods.cif.foreground import foreground_grid, resolve_rule
from mmiad.methods.cif.hypergraph import build_incidence, hyperedge_features, propagate
from mmiad.methods.cif.memory import ClusterBank, cluster_means, sample_per_cluster, sampling_rate
from mmiad.methods.cif.search import hyperedge_search, matched_clusters, nearest_in_bank, reweighted_image_score
from mmiad.methods.modelfile import ModelFileError
from mmiad.methods.registry import register_method
from mmiad.postprocess.smoothing import smooth_maps

MODALITIES = ("rgb", "xyz")


def fuse_maps(
    rgb: torch.Tensor, xyz: torch.Tensor, out_size: int, *, power: float, smoothing: str, sigma: float
) -> torch.Tensor:
    """out_size² map: each grid map upsampled (bilinear, align_corners=True), multiplied, raised to ``power``,
    then smoothed (official: the 5×box5 + 3×box7 cascade, zero padding). The power comes before the blur."""
    grids = torch.stack([rgb, xyz]).float().unsqueeze(0)
    upsampled = F.interpolate(grids, size=(out_size, out_size), mode="bilinear", align_corners=True)[0]
    return smooth_maps((upsampled[0] * upsampled[1]).pow(power), smoothing, sigma)


class PatchSet:
    """One sample's patch rows on the feature grid: RGB (N×C2), XYZ (N×C3), foreground (N) and the rule used."""

    def __init__(self, rgb: torch.Tensor, xyz: torch.Tensor, foreground: torch.Tensor, rule: str) -> None:
        self.rgb, self.xyz, self.foreground, self.rule = rgb, xyz, foreground, rule

    @property
    def grid(self) -> int:
        """Side of the patch grid."""
        return round(self.foreground.numel() ** 0.5)


@register_method("cif")
class CIF(AnomalyModel):
    """Few-shot hypergraph memory with message passing and hyperedge-guided search (see :class:`CIFConfig`).

    Learned state: per modality ``banks_[m] = (M×D nodes, M cluster ids)``, ``n_clusters_``, ``grid_``,
    ``n_shots_`` (the images the memory was built from), ``foreground_rules_`` (the rules those images used).
    """

    config_class = CIFConfig
    config: CIFConfig
    few_shot: ClassVar[bool] = True
    tiny_hparams: ClassVar[dict[str, Any]] = {"image_size": 64}

    def _patches(self, features: SampleFeatures) -> PatchSet:
        """Patch rows on the RGB feature grid (the 3D map projected to it) and the sample's foreground there."""
        settings = self.settings
        image = features.image.float()
        grid = int(image.shape[-1])
        inputs = features.inputs
        if image.shape[-2] != grid:
            where = inputs.record.rgb_path if inputs.record is not None else None
            raise DataError(where, f"CIF needs a square feature grid, got {tuple(image.shape[-2:])}")
        record_format = inputs.record.format if inputs.record is not None else "folder"
        rule = resolve_rule(settings.foreground, record_format, self.pipeline.profile.remove_plane)
        foreground = foreground_grid(
            inputs, rule, grid, threshold=settings.plane_threshold, fills=settings.gap_fills
        ).flatten()
        rgb = image.flatten(1).T.contiguous()
        xyz = features.points.to_grid(grid).float().flatten(1).T.contiguous()
        return PatchSet(rgb, xyz, foreground, rule)

    def _incidence(self, patches: PatchSet) -> torch.Tensor:
        settings = self.settings
        return build_incidence(
            patches.rgb, patches.foreground, self.n_clusters_, settings.membership_threshold, settings.kmeans_seed
        )

    # ------------------------------------------------------------------ memory
    def fit(
        self, records: Sequence[SampleRecord], *, progress: bool = False, errors: list[DataError] | None = None
    ) -> CIF:
        """Build both memories from the shots, in the given order (the first shot fixes the cluster ids)."""
        if not records:
            raise ValueError("CIF.fit needs at least one nominal image (a shot)")
        settings = self.settings
        prepared = self.pipeline.preprocess(records, progress=progress, errors=errors)
        banks: dict[str, ClusterBank] = {}
        shots = 0
        rules: set[str] = set()
        for record, features in self.pipeline.iter_features(prepared, progress=progress, errors=errors):
            patches = self._patches(features)
            if not banks:
                self.n_clusters_ = clusters_for(record.format, settings.n_clusters)
                self.grid_ = patches.grid
                banks = {m: ClusterBank(self.n_clusters_) for m in MODALITIES}
            if patches.grid != self.grid_:
                raise DataError(record.rgb_path, f"feature grid {patches.grid} differs from the first shot's")
            incidence = self._incidence(patches)
            for name, rows in (("rgb", patches.rgb), ("xyz", patches.xyz)):
                banks[name].add(rows, incidence, hyperedge_features(rows, incidence))
            rules.add(patches.rule)
            shots += 1
        if not shots:
            raise ValueError("no usable training sample (all were reported as bad)")
        rate = sampling_rate(settings.sampling_ratio, shots, self.grid_**2, banks["rgb"].size)
        self.banks_: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, bank in banks.items():
            rows, ids = bank.all()
            keep = sample_per_cluster(rows, ids, self.n_clusters_, rate, eps=settings.coreset_eps, seed=settings.seed)
            self.banks_[name] = (rows[keep].contiguous(), ids[keep].contiguous())
        self.n_shots_ = shots
        self.foreground_rules_ = sorted(rules)
        self.fitted_ = True
        return self

    # ------------------------------------------------------------------ scoring
    def _modality(
        self, name: str, rows: torch.Tensor, incidence: torch.Tensor, foreground: torch.Tensor
    ) -> tuple[torch.Tensor, float]:
        """(N patch scores, image score) of one modality: propagate, HGMS × global 1-NN, reweighted maximum."""
        settings = self.settings
        bank, ids = (t.to(rows.device) for t in self.banks_[name])
        propagated = propagate(rows, incidence, bank, ids, self.n_clusters_, hops=settings.hops, alpha=settings.alpha)
        memory_edges, present = cluster_means(bank, ids, self.n_clusters_)
        clusters = matched_clusters(
            hyperedge_features(propagated, incidence), memory_edges, present, settings.top_hyperedges
        )
        guided = hyperedge_search(propagated, incidence, clusters, bank, ids)
        nearest, locations = nearest_in_bank(propagated, foreground, bank)
        scores = guided * nearest
        return scores, reweighted_image_score(scores, locations, rows, bank, settings.n_neighbors)

    def score(self, features: Sequence[SampleFeatures]) -> list[Scored]:
        """Per sample: the fused, smoothed map and the product of the two modalities' image scores."""
        settings = self.settings
        device = self.device
        results = []
        for sample in features:
            patches = self._patches(sample)
            if patches.grid != self.grid_:
                record = sample.inputs.record
                where = record.rgb_path if record is not None else None
                raise DataError(where, f"feature grid {patches.grid} differs from the memory's {self.grid_}")
            incidence = self._incidence(patches).to(device)
            foreground = patches.foreground.to(device)
            maps, image_score = [], 1.0
            for name, rows in (("rgb", patches.rgb), ("xyz", patches.xyz)):
                scores, value = self._modality(name, rows.to(device), incidence, foreground)
                maps.append(scores.view(self.grid_, self.grid_).cpu())
                image_score *= value
            fused = fuse_maps(
                maps[0],
                maps[1],
                settings.image_size,
                power=settings.power,
                smoothing=settings.smoothing,
                sigma=settings.sigma,
            )
            results.append(
                Scored(
                    score=image_score,
                    anomaly_map=fused.numpy(),
                    modality_maps={"2d": maps[0].numpy(), "3d": maps[1].numpy()},
                )
            )
        return results

    # ------------------------------------------------------------------ persistence
    def learned_facts(self) -> dict[str, Any]:
        """K, the grid, the number of shots and the foreground rules the memory was built with."""
        return {
            "n_clusters": self.n_clusters_,
            "grid": self.grid_,
            "n_shots": self.n_shots_,
            "foreground_rules": self.foreground_rules_,
        }

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Both memories: ``<modality>.nodes`` (M×D float32) and ``<modality>.ids`` (M int64)."""
        self.check_fitted()
        tensors = {}
        for name, (rows, ids) in self.banks_.items():
            tensors[f"{name}.nodes"] = rows.cpu()
            tensors[f"{name}.ids"] = ids.cpu().long()
        return tensors

    def load_state(self, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Restore the memories, checking shapes and that every id is a cluster of K."""
        self.n_clusters_ = int(config["n_clusters"])
        self.grid_ = int(config["grid"])
        self.n_shots_ = int(config.get("n_shots", 0))
        self.foreground_rules_ = list(config.get("foreground_rules", []))
        self.banks_ = {}
        for name in MODALITIES:
            rows, ids = tensors[f"{name}.nodes"].float(), tensors[f"{name}.ids"].long()
            if rows.ndim != 2 or ids.shape != (rows.shape[0],) or rows.shape[0] == 0:
                raise ModelFileError(f"CIF {name} memory of shape {tuple(rows.shape)} with {tuple(ids.shape)} ids")
            if int(ids.min()) < 0 or int(ids.max()) >= self.n_clusters_:
                raise ModelFileError(f"CIF {name} memory has cluster ids outside 0..{self.n_clusters_ - 1}")
            if not bool(torch.isfinite(rows).all()):
                raise ModelFileError(f"CIF {name} memory has non-finite values")
            self.banks_[name] = (rows, ids)
