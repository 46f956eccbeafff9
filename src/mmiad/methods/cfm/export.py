"""CFM's scoring head as an ONNX graph (``scorer.onnx``), for ``mmiad export``.

The graph runs the same functions as :meth:`mmiad.methods.cfm.CFM.score_features` and
:func:`~mmiad.methods.cfm.scoring.finalize_map`; see :mod:`mmiad.export.graphs` for the contract.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from mmiad.export.graphs import check_exportable_smoothing, export_scorer_graph
from mmiad.methods.cfm.mapping import feature_discrepancy
from mmiad.methods.cfm.scoring import aggregate
from mmiad.postprocess.smoothing import smooth_maps

if TYPE_CHECKING:
    from mmiad.methods.cfm.model import CFM


class CfmScorer(nn.Module):
    """CFM from aligned grids to the final map and image score (``score_features`` + ``finalize_map``).

    Inputs: 2D grid (C2,G,G), 3D grid (C3,G,G), foreground (G,G) bool. Outputs: final (S,S) map, 2D and 3D
    discrepancy maps (G,G), image score (scalar). The MLPs run on every pixel and the background is masked
    afterwards; per-pixel results are the same as running on the foreground rows only.
    """

    def __init__(
        self,
        map_to_3d: nn.Module,
        map_to_2d: nn.Module,
        *,
        crossmodal: bool,
        aggregation: str,
        out_size: int,
        smoothing: str,
        sigma: float,
        compat: bool,
    ) -> None:
        super().__init__()
        check_exportable_smoothing(smoothing)
        self.map_to_3d = map_to_3d
        self.map_to_2d = map_to_2d
        self.crossmodal = crossmodal
        self.aggregation = aggregation
        self.out_size = out_size
        self.smoothing = smoothing
        self.sigma = sigma
        self.compat = compat

    def forward(
        self, grid_2d: torch.Tensor, grid_3d: torch.Tensor, foreground: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        rows_2d = grid_2d.flatten(1).transpose(0, 1)
        rows_3d = grid_3d.flatten(1).transpose(0, 1)
        source_3d, source_2d = (rows_2d, rows_3d) if self.crossmodal else (rows_3d, rows_2d)
        mask = foreground.flatten()
        zero = torch.zeros((), dtype=rows_2d.dtype)
        distance_3d = torch.where(mask, feature_discrepancy(self.map_to_3d(source_3d), rows_3d), zero)
        distance_2d = torch.where(mask, feature_discrepancy(self.map_to_2d(source_2d), rows_2d), zero)
        map_2d = distance_2d.reshape(foreground.shape)
        map_3d = distance_3d.reshape(foreground.shape)
        combined = aggregate(map_2d, map_3d, self.aggregation)
        if combined.shape[-1] != self.out_size:
            size = (self.out_size, self.out_size)
            combined = F.interpolate(combined[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
        smoothed = smooth_maps(combined, self.smoothing, self.sigma)
        if not self.compat:
            return smoothed, map_2d, map_3d, smoothed.max()
        # The official image score: max / sqrt(mean of the non-zero pixels), 1 when all pixels are zero.
        nonzero = smoothed != 0
        count = nonzero.sum().to(smoothed.dtype)
        total = torch.where(nonzero, smoothed, zero).sum()
        mean_nonzero = torch.where(count > 0, total / count.clamp_min(1.0), torch.ones((), dtype=smoothed.dtype))
        return smoothed, map_2d, map_3d, (smoothed / mean_nonzero.sqrt()).max()


def export_cfm_scorer(model: CFM, out_dir: str | Path) -> dict[str, Any]:
    """``scorer.onnx`` of a fitted CFM: grid_2d, grid_3d, foreground → anomaly_map, map_2d, map_3d, score."""
    model.check_fitted()
    settings = model.settings
    # CPU copies: the graph is traced on CPU inputs whatever device the model runs on.
    scorer = CfmScorer(
        copy.deepcopy(model.map_to_3d_).cpu().eval(),
        copy.deepcopy(model.map_to_2d_).cpu().eval(),
        crossmodal=settings.mapping == "crossmodal",
        aggregation=settings.aggregation,
        out_size=settings.image_size,
        smoothing=settings.smoothing,
        sigma=settings.sigma,
        compat=settings.compat,
    )
    grid, size = settings.grid_size, settings.image_size
    # Whatever the mapping, each network predicts its own modality, so its output width is that modality's.
    in_2d, in_3d = model.map_to_2d_.output.out_features, model.map_to_3d_.output.out_features
    return export_scorer_graph(scorer, in_2d, in_3d, grid, size, out_dir)
