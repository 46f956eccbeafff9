"""Uni-RCM's scoring head as an ONNX graph, with the same contract as CFM's ``scorer.onnx``.

Everything between the aligned feature grids and the image score is dense, so it all goes into one graph: the
two reference-guided mappings, the ORQ encoding (per layer: squared distances as ``|x|² − 2·x·Cᵀ + |c|²`` with a
matmul, argmin, gather, residual update — the same formula as the PyTorch quantizer, so ties break the same way),
eq. 8's combination, the bilinear upsampling, the smoothing as a fixed convolution and the image score. The
runtime therefore feeds it exactly what it feeds CFM's scorer.

The official (``compat``) path blurs the final map through PIL on a uint8 copy, which no ONNX graph reproduces,
so a compat model is refused with a clear error; the paper path (Gaussian, box cascade or no smoothing) exports.
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
from mmiad.methods.unircm.orq import ResidualQuantizer
from mmiad.postprocess.smoothing import smooth_maps

if TYPE_CHECKING:
    from mmiad.methods.unircm.model import UniRCM


class OrqScore(nn.Module):
    """ORQ anomaly score of (N, D) rows: the norm of the residual left after every codebook (eq. 4).

    Mirrors :meth:`ResidualQuantizer.score` with the codebooks as constants of the graph.
    """

    def __init__(self, quantizer: ResidualQuantizer) -> None:
        super().__init__()
        if not quantizer.codebooks_:
            raise ValueError("the ORQ quantizer is not fitted; nothing to export")
        books = [book.detach().float().cpu() for book in quantizer.codebooks_]
        for layer, book in enumerate(books):
            self.register_buffer(f"codebook_{layer}", book)
        self.layers = len(books)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        residual = rows
        for layer in range(self.layers):
            codebook: torch.Tensor = getattr(self, f"codebook_{layer}")
            # The quantizer's own distance formula (not torch.cdist), so the nearest code is the same one.
            squared = (
                (residual * residual).sum(dim=1, keepdim=True)
                - 2 * residual @ codebook.T
                + (codebook * codebook).sum(dim=1)
            )
            residual = residual - codebook[squared.argmin(dim=1)]
        return (residual * residual).sum(dim=1).sqrt()


class UniRcmScorer(nn.Module):
    """Uni-RCM from aligned grids to the final map and image score (``score_grids`` + ``finalize_map``).

    Inputs: 2D grid (C2,G,G), 3D grid (C3,G,G), foreground (G,G) bool. Outputs: final (S,S) map, 2D and 3D
    mapping discrepancy maps (G,G), image score (max of the final map). The ORQ runs on every pixel and the
    background is zeroed afterwards; per pixel this equals scoring the foreground rows only.

    Args:
        map_to_3d: 2D→3D reference-guided mapping.
        map_to_2d: 3D→2D reference-guided mapping.
        orq_2d: 2D quantizer, or None (no ORQ term).
        orq_3d: 3D quantizer, or None.
        beta_2d: ORQ weight of the 2D factor.
        beta_3d: ORQ weight of the 3D factor.
        normalize_orq: Divide each ORQ map by its per-image maximum (the official behaviour).
        out_size: Side S of the final map.
        smoothing: One of :data:`~mmiad.export.graphs.EXPORTABLE_SMOOTHINGS`.
        sigma: Gaussian σ in output pixels.
    """

    def __init__(
        self,
        map_to_3d: nn.Module,
        map_to_2d: nn.Module,
        orq_2d: ResidualQuantizer | None,
        orq_3d: ResidualQuantizer | None,
        *,
        beta_2d: float,
        beta_3d: float,
        normalize_orq: bool,
        out_size: int,
        smoothing: str,
        sigma: float,
    ) -> None:
        super().__init__()
        check_exportable_smoothing(smoothing)
        self.map_to_3d = map_to_3d
        self.map_to_2d = map_to_2d
        both = (orq_2d, orq_3d) if orq_2d is not None and orq_3d is not None else None
        self.orq_2d = OrqScore(both[0]) if both is not None else None
        self.orq_3d = OrqScore(both[1]) if both is not None else None
        self.beta_2d, self.beta_3d = float(beta_2d), float(beta_3d)
        self.normalize_orq = normalize_orq
        self.out_size = out_size
        self.smoothing = smoothing
        self.sigma = sigma

    def _orq_map(self, quantizer: nn.Module, rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        zero = torch.zeros((), dtype=rows.dtype)
        scores = torch.where(mask, quantizer(rows), zero)
        if not self.normalize_orq:
            return scores
        peak = scores.max()
        return torch.where(peak > 0, scores / torch.where(peak > 0, peak, torch.ones_like(peak)), scores)

    def forward(
        self, grid_2d: torch.Tensor, grid_3d: torch.Tensor, foreground: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        rows_2d = grid_2d.flatten(1).transpose(0, 1)
        rows_3d = grid_3d.flatten(1).transpose(0, 1)
        mask = foreground.flatten()
        zero = torch.zeros((), dtype=rows_2d.dtype)
        distance_3d = feature_discrepancy(self.map_to_3d(rows_2d[None])[0], rows_3d)
        distance_2d = feature_discrepancy(self.map_to_2d(rows_3d[None])[0], rows_2d)
        flat_2d = torch.where(mask, distance_2d, zero)
        flat_3d = torch.where(mask, distance_3d, zero)
        if self.orq_2d is not None and self.orq_3d is not None:
            factor_2d = flat_2d + self.beta_2d * self._orq_map(self.orq_2d, rows_2d, mask)
            factor_3d = flat_3d + self.beta_3d * self._orq_map(self.orq_3d, rows_3d, mask)
        else:
            factor_2d, factor_3d = flat_2d, flat_3d
        combined = torch.where(mask, factor_2d * factor_3d, zero).reshape(foreground.shape)
        if combined.shape[-1] != self.out_size:
            size = (self.out_size, self.out_size)
            combined = F.interpolate(combined[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
        smoothed = smooth_maps(combined, self.smoothing, self.sigma)
        return smoothed, flat_2d.reshape(foreground.shape), flat_3d.reshape(foreground.shape), smoothed.max()


def unircm_scorer(model: UniRCM) -> UniRcmScorer:
    """The exportable scorer of a fitted, non-compat Uni-RCM (CPU copies of its networks, eval mode)."""
    model.check_fitted()
    config = model.settings
    if config.compat:
        raise ValueError(
            "a compat Uni-RCM cannot be exported: its final map is blurred through PIL on a uint8 copy "
            "(smoothing 'pil_uint8'), which ONNX cannot reproduce; export a model with compat=False"
        )
    return UniRcmScorer(
        copy.deepcopy(model.map_to_3d_).cpu().eval(),
        copy.deepcopy(model.map_to_2d_).cpu().eval(),
        model.orq_2d_,
        model.orq_3d_,
        beta_2d=float(config.beta_2d),
        beta_3d=float(config.beta_3d),
        normalize_orq=config.orq_normalization == "image_max",
        out_size=config.image_size,
        smoothing=config.smoothing,
        sigma=config.sigma,
    )


def export_unircm_scorer(model: UniRCM, out_dir: str | Path) -> dict[str, Any]:
    """``scorer.onnx`` of a fitted Uni-RCM: grid_2d, grid_3d, foreground → anomaly_map, map_2d, map_3d, score."""
    scorer = unircm_scorer(model)
    grid, size = model.config.grid_size, model.config.image_size
    in_2d, in_3d = model.map_to_3d_.in_features, model.map_to_2d_.in_features
    return export_scorer_graph(scorer, in_2d, in_3d, grid, size, out_dir)
