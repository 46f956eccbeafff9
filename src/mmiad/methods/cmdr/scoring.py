"""CMDR-IAD's test-time scoring, step by step as the official ``inference.py`` (3d201cd).

From four per-pixel discrepancies (normalised Euclidean distances, zero on the background):

1. only the 2D reconstruction error is pre-smoothed (3× 5×5 box, then 2× 7×7);
2. the mapping errors are fused by a reliability gate: joint = d_map2d · d_map3d,
   W = 4 + 2 · σ_local / mean(σ_local) with σ_local the 7×7 local standard deviation, A_map = sigmoid(W·joint)·joint;
3. the reconstruction errors by confidence weights exp(−0.3 d): the larger error gets the smaller weight;
4. Ψ = A_map · A_rec, zero on the background, smoothed by CFM's box cascade (5× 5×5, then 3× 7×7);
5. CFM's three per-image normalisations: the image score is max Ψ / sqrt(mean of Ψ ≠ 0), AUPRO reads Ψ / mean of
   Ψ ≠ 0 and P-AUROC reads Ψ / sqrt(mean Ψ).

Single-modality modes: ``xyz`` follows the official 3D-only (polyurethane) script, ``rgb`` is inferred (see the
README and :func:`rgb_only_map`). All functions take H×W float maps and work in their dtype and device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmiad.methods.cfm.scoring import ScoredMap, finalize_map
from mmiad.postprocess.smoothing import box_passes

#: The 2D reconstruction error's pre-smoothing (``inference.py`` L172-175).
REC2D_PASSES = ((5, 3), (7, 2))
#: The 3D-only script's single 5×5 box.
XYZ_PASSES = ((5, 1),)
GATE_ALPHA = 4.0
GATE_BETA = 2.0
GATE_WINDOW = 7
GATE_EPS = 1e-8
CONFIDENCE_B = 0.3
CONFIDENCE_EPS = 1e-8
XYZ_EPS = 1e-6


def smooth(single: torch.Tensor, passes: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """Box passes of one H×W map (zero padding)."""
    return box_passes(single[None], passes)[0]


def gated_mapping_anomaly(map_2d: torch.Tensor, map_3d: torch.Tensor) -> torch.Tensor:
    """A_map = sigmoid(W · joint) · joint with joint = map_2d · map_3d and W = 4 + 2 σ_local / mean(σ_local).

    The mean of joint and the mean of σ_local are over every pixel, background zeros included; σ_local is the
    square root of a 7×7 average (zero padding counted in the divisor, PyTorch's default) of (joint − μ)².
    """
    joint = map_2d * map_3d
    centred = (joint - joint.mean()) ** 2
    local = F.avg_pool2d(centred[None, None], GATE_WINDOW, stride=1, padding=GATE_WINDOW // 2, count_include_pad=True)
    sigma = local[0, 0].sqrt()
    weight = GATE_ALPHA + GATE_BETA * sigma / (sigma.mean() + GATE_EPS)
    return torch.sigmoid(weight * joint) * joint


def confident_reconstruction(rec_2d: torch.Tensor, rec_3d: torch.Tensor) -> torch.Tensor:
    """A_rec = (w2·rec_2d + w3·rec_3d) / (w2 + w3 + 1e-8) with w = exp(−0.3·d) (``rec_2d`` already smoothed)."""
    w2, w3 = torch.exp(-CONFIDENCE_B * rec_2d), torch.exp(-CONFIDENCE_B * rec_3d)
    return (w2 * rec_2d + w3 * rec_3d) / (w2 + w3 + CONFIDENCE_EPS)


def fused_map(
    map_2d: torch.Tensor, map_3d: torch.Tensor, rec_2d: torch.Tensor, rec_3d: torch.Tensor, foreground: torch.Tensor
) -> torch.Tensor:
    """Ψ = A_map · A_rec before the final smoothing, zero on the background (the four inputs are masked already)."""
    psi = gated_mapping_anomaly(map_2d, map_3d) * confident_reconstruction(smooth(rec_2d, REC2D_PASSES), rec_3d)
    return torch.where(foreground, psi, torch.zeros_like(psi))


def rgb_only_map(rec_2d: torch.Tensor, foreground: torch.Tensor) -> torch.Tensor:
    """The 2D-only Ψ (inferred): the 2D reconstruction error alone, pre-smoothed as in the fused mode, masked.

    It is the fused path with the mapping gate and the 3D term removed, so it is smoothed and normalised as the
    fused Ψ is (:func:`finalize`).
    """
    smoothed = smooth(rec_2d, REC2D_PASSES)
    return torch.where(foreground, smoothed, torch.zeros_like(smoothed))


def finalize(psi: torch.Tensor) -> ScoredMap:
    """CFM's official smoothing and three normalisations of an S×S Ψ (:func:`mmiad.methods.cfm.scoring.finalize_map`).

    ``anomaly_map`` is the smoothed Ψ, ``score`` max Ψ / sqrt(mean of Ψ ≠ 0), ``metric_maps`` the AUPRO and
    P-AUROC maps.
    """
    return finalize_map(psi, out_size=psi.shape[-1], smoothing="box_cascade", sigma=0.0, compat=True)


def xyz_only(rec_3d: torch.Tensor) -> ScoredMap:
    """The official 3D-only score: d_rec3d (masked), one 5×5 box, ÷ (sqrt(mean of non-zero) + 1e-6), plain max.

    The one normalised map serves every metric (the script evaluates P-AUROC and AUPRO on it).
    """
    smoothed = smooth(rec_3d, XYZ_PASSES)
    nonzero = smoothed[smoothed != 0]
    mean = nonzero.mean() if nonzero.numel() else smoothed.new_tensor(1.0)
    normalised = smoothed / (mean.sqrt() + XYZ_EPS)
    return ScoredMap(normalised, float(normalised.max()), {})
