"""Predicting with an ONNX export: the graphs run in onnxruntime, the data-dependent steps stay in Python.

Preprocessing, FPFH, Point-MAE's grouping and the 3D→grid projection reuse the library's own code (they are
cheap next to the networks and have no good ONNX form); the 2D extractor, Point-MAE's encoder and the scoring head
run from the exported graphs. Predictions are the same :class:`~mmiad.methods.base.Prediction` objects the PyTorch
model yields, and they come from the engine's one scoring loop (reading, batching, the single-modality fallback,
thresholds), so a sample is treated as ``mmiad predict --run`` treats it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmiad.data.errors import DataError
from mmiad.data.preprocess import get_profile
from mmiad.data.sample import SampleRecord
from mmiad.engine.scoring import score_records
from mmiad.export._deps import cpu_session
from mmiad.export.manifest import FALLBACK_FILE, Manifest
from mmiad.features.base import PointFeatureExtractor, PointFeatures, feature_points
from mmiad.features.grouping import group_points, three_nn_weights
from mmiad.features.pipeline import FeaturePipeline, SampleFeatures
from mmiad.features.registry import default_cache_dir
from mmiad.methods.base import Prediction, Scored
from mmiad.methods.cfm.scoring import finalize_map
from mmiad.methods.fallback import ModalityFallback
from mmiad.methods.modelfile import ModelFileError, load_model_file
from mmiad.postprocess.threshold import Thresholds


class OnnxImageExtractor:
    """An :class:`~mmiad.features.base.ImageFeatureExtractor` running ``image_extractor.onnx``."""

    def __init__(self, path: str | Path, source_config: dict[str, Any], out_channels: int) -> None:
        self.session: Any = cpu_session(str(path))
        self.source_config = source_config
        self.out_channels = out_channels

    def config(self) -> dict[str, Any]:
        """The exported extractor's configuration, marked as running from ONNX."""
        return {"kind": "onnx", "source": self.source_config}

    def extract(self, rgb: torch.Tensor) -> torch.Tensor:
        """(B,3,S,S) normalised RGB → (B,C,h,w) features."""
        array = np.ascontiguousarray(rgb.detach().float().cpu().numpy())
        return torch.from_numpy(self.session.run(["features"], {"rgb": array})[0])


class OnnxPointMaeExtractor:
    """A :class:`~mmiad.features.base.PointFeatureExtractor`: Python grouping, ``point_extractor.onnx`` encoder.

    Mirrors :meth:`mmiad.features.pointmae.PointMaeExtractor.extract` with the network call replaced.
    """

    def __init__(self, path: str | Path, source_config: dict[str, Any], out_channels: int) -> None:
        self.session: Any = cpu_session(str(path))
        self.source_config = source_config
        self.out_channels = out_channels
        self.num_group = int(source_config["num_group"])
        self.group_size = int(source_config["group_size"])

    def config(self) -> dict[str, Any]:
        """The exported extractor's configuration, marked as running from ONNX."""
        return {"kind": "onnx", "source": self.source_config}

    def extract(self, xyz: np.ndarray, valid: np.ndarray) -> PointFeatures:
        """Features of one S×S organized cloud (zero groups when no point is valid, as the PyTorch extractor)."""
        xyz, valid = np.asarray(xyz), np.asarray(valid)
        if xyz.ndim != 3 or xyz.shape[-1] != 3 or valid.shape != xyz.shape[:2] or valid.dtype != np.bool_:
            raise ValueError(f"expected an (S,S,3) cloud and an (S,S) bool mask, got {xyz.shape} and {valid.shape}")
        # Exports made before the rule was recorded used "any".
        used = feature_points(xyz, valid, str(self.source_config.get("nonzero", "any")))
        pixel_index = np.flatnonzero(used.reshape(-1))
        points = torch.from_numpy(np.ascontiguousarray(xyz.reshape(-1, 3)[pixel_index], dtype=np.float32))
        if points.shape[0] == 0:
            features = torch.zeros(0, self.out_channels)
            neighbors, weights = torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 3)
        else:
            groups, centres = group_points(points, self.num_group, self.group_size)
            feeds = {"neighborhoods": groups.numpy(), "centres": centres.numpy()}
            features = torch.from_numpy(self.session.run(["features"], feeds)[0])
            neighbors, weights = three_nn_weights(points, centres)
        return PointFeatures(features, torch.from_numpy(pixel_index.astype(np.int64)), neighbors, weights, xyz.shape[0])


def _point_extractor(manifest: Manifest, directory: Path) -> PointFeatureExtractor:
    """The 3D side: the ONNX encoder for Point-MAE, the Python FPFH with the exported settings otherwise."""
    config = manifest.pipeline["point"]
    graph = manifest.graphs.get("point_extractor")
    if graph is not None:
        channels = int(graph["outputs"][0]["shape"][-1])
        return OnnxPointMaeExtractor(directory / graph["file"], config, channels)
    if config.get("name") != "fpfh":
        raise ModelFileError(f"{directory}: no point_extractor graph and the 3D extractor is not FPFH: {config}")
    from mmiad.features.fpfh import FPFHExtractor

    settings = {k: v for k, v in config.items() if k != "name"}
    try:
        extractor = FPFHExtractor(**settings)
    except TypeError as error:
        raise ModelFileError(f"{directory}: FPFH settings {settings} are not understood by this mmiad") from error
    if extractor.config() != config:
        raise ModelFileError(f"{directory}: FPFH here computes {extractor.config()}, the export expects {config}")
    return extractor


class OnnxPredictor:
    """Scores samples with an exported CFM (one model export folder, see :mod:`mmiad.export.model`).

    Args:
        directory: A model export folder (holding ``manifest.json``).
        cache_dir: Where preprocessed copies of the inputs go (default ``$MMIAD_CACHE``). Features are never
            cached: the export may run where the training cache is absent, and re-extraction is the point.

    Attributes:
        manifest: The export's manifest.
        thresholds: Calibrated thresholds stored at export, or None.
    """

    def __init__(self, directory: str | Path, *, cache_dir: str | Path | None = None) -> None:
        directory = Path(directory)
        self.manifest = Manifest.read(directory)
        if self.manifest.method not in ("cfm", "unircm"):
            raise ModelFileError(
                f"{directory}: ONNX prediction supports CFM and Uni-RCM exports, not {self.manifest.method!r}"
            )
        stored = self.manifest.thresholds
        self.thresholds = Thresholds.from_dict(stored) if stored is not None else None
        self.hparams: dict[str, Any] = self.manifest.model_config["hparams"]
        pipeline = self.manifest.pipeline
        profile = get_profile(pipeline["profile"])
        if profile.fingerprint() != pipeline["profile_fingerprint"]:
            raise ModelFileError(f"{directory}: preprocessing profile {profile.name!r} differs from the exported one")
        image_graph = self.manifest.graphs["image_extractor"]
        image = OnnxImageExtractor(
            directory / image_graph["file"], pipeline["image"], int(image_graph["outputs"][0]["shape"][1])
        )
        root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        point = _point_extractor(self.manifest, directory)
        self.pipeline = FeaturePipeline(image, point, profile, self.manifest.image_size, None, root)
        self.scorer: Any = cpu_session(str(directory / self.manifest.graphs["scorer"]["file"]))
        self.directory = directory
        self.fallback, self.fallback_thresholds = load_fallback(directory)

    @classmethod
    def from_export(
        cls, path: str | Path, category: str | None = None, *, cache_dir: str | Path | None = None
    ) -> OnnxPredictor:
        """The predictor for ``category`` in an export of a run (or for a model export folder itself)."""
        from mmiad.export.model import resolve_export

        return cls(resolve_export(path, category), cache_dir=cache_dir)

    def score_features(self, features: SampleFeatures) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """(final S×S map, 2D map, 3D map, image score) from the scorer graph."""
        grid_2d, grid_3d, foreground = features.on_grid(self.manifest.grid_size)
        feeds = {
            "grid_2d": np.ascontiguousarray(grid_2d.float().numpy()),
            "grid_3d": np.ascontiguousarray(grid_3d.float().numpy()),
            "foreground": np.ascontiguousarray(foreground.numpy()),
        }
        final, map_2d, map_3d, score = self.scorer.run(["anomaly_map", "map_2d", "map_3d", "score"], feeds)
        return final, map_2d, map_3d, float(score)

    # The engine's scoring loop reads these (see :class:`mmiad.engine.scoring.Scorer`).
    whole_batch = False
    score_batch_size = 8

    @property
    def name(self) -> str:
        """The exported method's name."""
        return f"{self.manifest.method} (onnx)"

    def prepare_scoring(self) -> None:
        """Nothing to prepare: the ONNX sessions are ready."""

    def score(self, features: Sequence[SampleFeatures]) -> list[Scored]:
        """Maps and image scores from the scorer graph, as the method's own ``score``."""
        results = []
        for sample in features:
            final, map_2d, map_3d, score = self.score_features(sample)
            metric_maps: dict[str, np.ndarray] = {}
            if self.hparams.get("compat"):
                # The final map is already smoothed; only the official per-metric normalisations remain.
                scored = finalize_map(
                    torch.from_numpy(final), out_size=final.shape[-1], smoothing="none", sigma=0.0, compat=True
                )
                metric_maps = {name: m.numpy() for name, m in scored.metric_maps.items()}
            results.append(Scored(score, final, {"2d": map_2d, "3d": map_3d}, metric_maps))
        return results

    def predict(
        self,
        records: Sequence[SampleRecord],
        *,
        thresholds: Thresholds | None = None,
        strict: bool = False,
        keep_rgb: bool = False,
        progress: bool = False,
        errors: list[DataError] | None = None,
    ) -> Iterator[Prediction]:
        """Labelled predictions through the engine's scoring loop, as ``mmiad predict --run`` (``thresholds``: the
        exported ones when None); a sample missing a modality is scored by the exported fallback, degraded."""
        return score_records(
            self,
            records,
            thresholds=thresholds if thresholds is not None else self.thresholds,
            fallback=self.fallback,
            fallback_thresholds=self.fallback_thresholds,
            key=self.directory.name,
            strict=strict,
            keep_rgb=keep_rgb,
            progress=progress,
            errors=errors,
        )


def predict_with_onnx(
    export_dir: str | Path,
    records: Sequence[SampleRecord],
    *,
    category: str | None = None,
    thresholds: Thresholds | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = False,
    errors: list[DataError] | None = None,
) -> Iterator[Prediction]:
    """Predictions of an export with thresholds applied (the exported ones unless ``thresholds`` is given)."""
    predictor = OnnxPredictor.from_export(export_dir, category, cache_dir=cache_dir)
    return predictor.predict(records, thresholds=thresholds, progress=progress, errors=errors)


def load_fallback(directory: Path) -> tuple[ModalityFallback | None, dict[str, Thresholds]]:
    """The single-modality fallback exported beside the graphs (``fallback.safetensors``), or (None, {}) for an
    export of a model trained without one (or written before exports carried it)."""
    path = directory / FALLBACK_FILE
    if not path.is_file():
        return None, {}
    tensors, config = load_model_file(path)
    try:
        fallback = ModalityFallback.from_state(config, tensors)
        thresholds = {m: Thresholds.from_dict(t) for m, t in config.get("thresholds", {}).items()}
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise ModelFileError(f"{path}: does not describe a fallback ({type(error).__name__}: {error})") from error
    return fallback, thresholds
