"""Per-sample MuSc-V2 tokens from mmiad's feature pipeline: SNAMD-aggregated 2D patches and 3D groups.

MuSc-V2 scores tokens, not pixels: 2D patch tokens of each chosen ViT block (28×28 for DINO ViT-B/8 at 224) and
3D group tokens (one per Point-MAE group centre, each of the blocks 3/7/11). The pipeline provides preprocessing,
model inputs and the frozen extractors; the Point-MAE hook :meth:`~mmiad.features.pointmae.PointMaeExtractor.
extract_groups` runs the encoder on IPG groups and returns the centres. SNAMD is per sample, so it is applied here
and only the aggregated, normalised tokens are kept (the raw ones are never all held at once).

Per-point 3D extractors (FPFH, weight-free) have no groups; mmiad forms them the same way (FPS centres, kNN or IPG
members, ``num_group``×``group_size``) and a group's token is the mean of its members' descriptors. That is mmiad's
extension: the official code only runs Point-MAE.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from mmiad.data.errors import DataError
from mmiad.data.preprocess import ModelInput
from mmiad.data.sample import SampleRecord
from mmiad.features.grouping import three_nn_weights
from mmiad.features.pipeline import FeaturePipeline, SampleFeatures
from mmiad.methods.musc.config import MuScConfig
from mmiad.methods.musc.ipg import make_grouping
from mmiad.methods.musc.snamd import aggregate_2d, aggregate_3d


@dataclass
class SampleTokens:
    """What mutual scoring needs from one sample.

    Attributes:
        inputs: The model input (label, ground truth, geometry for mapping back).
        image: Per layer, (L2, C) L2-normalised aggregated patch tokens; empty in ``3d`` mode.
        grid: (h, w) of the 2D token grid.
        points: Per layer, (G, C) aggregated group tokens; empty in ``2d`` mode.
        centre_pixels: (G,) flat pixel index of each group centre on the S×S input.
        pixel_index: (P,) flat index of the valid pixels, for mapping group scores back.
        neighbors: (P,3) group rows each valid pixel blends (official 3-NN interpolation).
        weights: (P,3) blending weights.
    """

    inputs: ModelInput
    image: list[torch.Tensor]
    grid: tuple[int, int]
    points: list[torch.Tensor]
    centre_pixels: torch.Tensor
    pixel_index: torch.Tensor
    neighbors: torch.Tensor
    weights: torch.Tensor


def _normalised(tokens: torch.Tensor) -> torch.Tensor:
    return tokens / tokens.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def _image_tokens(
    pipeline: FeaturePipeline, inputs: ModelInput, config: MuScConfig, cached: Callable[[], SampleFeatures]
) -> tuple[list[torch.Tensor], tuple[int, int]]:
    extractor = pipeline.image_extractor
    if hasattr(extractor, "extract_layers"):
        with pipeline.extracting(extractor) as device:  # the tokens come back to the CPU in float32
            layers = extractor.extract_layers(inputs.rgb.unsqueeze(0).to(device), config.image_layers)
        maps = [m[0].to("cpu", torch.float32) for m in layers]
    else:
        maps = [cached().image]
    grid = (int(maps[0].shape[1]), int(maps[0].shape[2]))
    return [_normalised(aggregate_2d(m.float(), config.r_list)) for m in maps], grid


def _unit_sphere(points: torch.Tensor) -> torch.Tensor:
    """Official ``pc_normalize_mvtec``: centre on the mean and divide by the largest radius."""
    centred = points - points.mean(dim=0)
    return centred / centred.norm(dim=1).max().clamp(min=1e-12)


def _point_tokens(
    inputs: ModelInput,
    pipeline: FeaturePipeline,
    config: MuScConfig,
    record: SampleRecord | None,
    cached: Callable[[], SampleFeatures],
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    extractor = pipeline.point_extractor
    grouping = make_grouping(config.ipg, config.ipg_step, config.curvature_threshold)
    if not inputs.valid.any():
        path = record.xyz_path if record is not None else None
        raise DataError(path, "no valid 3D point: MuSc cannot score this sample's 3D modality")
    if hasattr(extractor, "extract_groups"):
        xyz = inputs.xyz
        if config.normalize_cloud:
            flat = torch.from_numpy(np.ascontiguousarray(xyz.reshape(-1, 3)[inputs.valid.reshape(-1)], np.float32))
            xyz = np.zeros_like(inputs.xyz, dtype=np.float32)
            xyz.reshape(-1, 3)[inputs.valid.reshape(-1)] = _unit_sphere(flat).numpy()
        with pipeline.extracting(extractor):
            groups = extractor.extract_groups(xyz, inputs.valid, grouping)
        features, points = groups.features.to("cpu"), groups.points.cpu()
        width = groups.layer_width
        layers = list(features.features.float().split(width, dim=1))
        centre_idx, neighbors, weights = groups.centre_idx.cpu(), features.neighbors, features.weights
        pixel_index = features.pixel_index
    else:
        features = cached().points
        if features.neighbors.shape[1] != 1:
            raise ValueError("a per-point 3D extractor must attach one feature row per valid pixel")
        per_point = features.features[features.neighbors[:, 0]].float()
        pixel_index = features.pixel_index
        points = torch.from_numpy(np.ascontiguousarray(inputs.xyz.reshape(-1, 3)[pixel_index.numpy()], np.float32))
        centre_idx, members = grouping(points, config.num_group, config.group_size)
        layers = [per_point[members].mean(dim=1)]
        neighbors, weights = three_nn_weights(points, points[centre_idx])
    centres = points[centre_idx]
    bends = grouping.curvature
    aggregated = [
        aggregate_3d(
            _normalised(layer.float()),
            centres,
            bends,
            config.r_list,
            pool=config.snamd_3d_pool,
            curvature_threshold=config.curvature_threshold,
        )
        for layer in layers
    ]
    return aggregated, pixel_index[centre_idx], pixel_index, neighbors, weights


def extract_tokens(pipeline: FeaturePipeline, record: SampleRecord, config: MuScConfig) -> SampleTokens:
    """Tokens of one preprocessed record, read here (benchmarks and tests; the engine uses :func:`tokens_of`).

    Extractors without a MuSc hook (texture, FPFH) go through :meth:`FeaturePipeline.extract` and so through the
    feature cache; the hooked ones (ViT layers, Point-MAE groups) are run directly, since their output depends on
    MuSc's settings (layers, grouping), which the cache key does not hold.
    """
    inputs = pipeline.load_inputs(record)
    stored: list[SampleFeatures] = []

    def cached() -> SampleFeatures:
        if not stored:
            stored.append(pipeline.extract(record))
        return stored[0]

    return tokens_of(pipeline, inputs, cached, config)


def tokens_of(
    pipeline: FeaturePipeline, inputs: ModelInput, features: Callable[[], SampleFeatures], config: MuScConfig
) -> SampleTokens:
    """Tokens of one sample from its model input and (for extractors without a MuSc hook) its pipeline features,
    for the configured modalities; no file is read.

    Raises:
        DataError: when the sample has no valid 3D point left to group (3D modality).
    """
    record = inputs.record
    image: list[torch.Tensor] = []
    grid = (0, 0)
    if config.modality != "3d":
        image, grid = _image_tokens(pipeline, inputs, config, features)
    empty = torch.zeros(0, dtype=torch.long)
    points: list[torch.Tensor] = []
    centre_pixels, pixel_index, neighbors, weights = empty, empty, empty.view(0, 3), torch.zeros(0, 3)
    if config.modality != "2d":
        points, centre_pixels, pixel_index, neighbors, weights = _point_tokens(
            inputs, pipeline, config, record, features
        )
    return SampleTokens(inputs, image, grid, points, centre_pixels, pixel_index, neighbors, weights)
