"""Export of the frozen extractors' dense parts: the 2D network, and Point-MAE's encoder.

FPFH (numpy, neighbourhood search) and Point-MAE's grouping (FPS, kNN) are data-dependent and stay in Python;
only the network that turns grouped points into tokens becomes a graph.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmiad.export.graphs import ExtractCall, GraphSpec, export_graph
from mmiad.features.pointmae import PointMaeExtractor
from mmiad.features.texture import TextureExtractor
from mmiad.features.vit import VisionTransformer, VitExtractor

IMAGE_GRAPH = "image_extractor.onnx"
POINT_GRAPH = "point_extractor.onnx"


def _vit_for_size(model: VisionTransformer, image_size: int) -> VisionTransformer:
    """A copy of ``model`` whose position embedding is already resized to the export's fixed input size.

    Resizing inside the graph would need the traced patch-grid size as a scale factor, which the exporter cannot
    express; the input side is fixed per export, so the resized embedding is a constant.
    """
    rows = image_size // model.preset.patch_size
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.pos_embed = nn.Parameter(model.position_embedding(rows, rows).detach().clone(), requires_grad=False)
    clone.pos_grid = rows
    return clone


def _traceable_texture(extractor: TextureExtractor) -> TextureExtractor:
    """A shallow copy whose filter matrices are looked up by plain ints.

    While tracing, image sides read from ``shape`` are tensors, so the extractor's matrix cache (keyed by side)
    misses and the matrices would be rebuilt inside the graph by an accumulating scatter that ONNX runs wrongly.
    The side is fixed per export, so looking the cached matrices up by ``int(side)`` makes them constants.
    """
    clone = copy.copy(extractor)
    lookup = extractor._filter_matrices

    def by_int(size: Any, sigma: float, norm_sigma: float) -> torch.Tensor:
        return lookup(int(size), sigma, norm_sigma)

    clone._filter_matrices = by_int  # type: ignore[method-assign]
    return clone


def image_module(extractor: Any, image_size: int) -> nn.Module:
    """The traceable module behind a 2D extractor (only the ViT and the texture descriptor have one)."""
    if isinstance(extractor, VitExtractor):
        return _vit_for_size(extractor.model, image_size)
    if isinstance(extractor, TextureExtractor):
        return ExtractCall(_traceable_texture(extractor))
    raise ValueError(f"cannot export a 2D extractor of type {type(extractor).__name__} (exportable: ViT, texture)")


def export_image_extractor(extractor: Any, out_dir: str | Path, image_size: int) -> dict[str, Any]:
    """``image_extractor.onnx``: rgb (B,3,S,S) ImageNet-normalised → features (B,C,h,w), B dynamic.

    Returns:
        The graph's manifest entry (file name, input and output names and shapes).
    """
    module = image_module(extractor, image_size)
    example = torch.zeros(2, 3, image_size, image_size)
    with torch.no_grad():
        channels, rows, cols = module(example).shape[1:]
    spec = GraphSpec(
        inputs={"rgb": ["batch", 3, image_size, image_size]},
        outputs={"features": ["batch", int(channels), int(rows), int(cols)]},
    )
    export_graph(module, (example,), Path(out_dir) / IMAGE_GRAPH, spec)
    return {"file": IMAGE_GRAPH, **spec.to_dict()}


def export_point_extractor(extractor: PointMaeExtractor, out_dir: str | Path) -> dict[str, Any]:
    """``point_extractor.onnx``: neighbourhoods (G,K,3) + centres (G,3) → features (G,C), G and K dynamic.

    Both axes are dynamic because small clouds form fewer and smaller groups (see ``group_points``). The
    encoder's BatchNorm mode is traced into the graph (with ``cloud``, the statistics of the graph's input).
    """
    if not isinstance(extractor, PointMaeExtractor):
        raise ValueError(f"only Point-MAE has a network to export, not {type(extractor).__name__}")
    if extractor.drop_path != "expected":
        raise ValueError("a Point-MAE with sampled DropPath cannot be exported (a graph has no per-cloud draws)")
    generator = torch.Generator().manual_seed(0)
    example = (torch.randn(6, 5, 3, generator=generator), torch.randn(6, 3, generator=generator))
    spec = GraphSpec(
        inputs={"neighborhoods": ["groups", "group_size", 3], "centres": ["groups", 3]},
        outputs={"features": ["groups", int(extractor.out_channels)]},
    )
    export_graph(extractor.model, example, Path(out_dir) / POINT_GRAPH, spec)
    return {"file": POINT_GRAPH, **spec.to_dict()}
