"""Cross-modal Anomaly Enhancement (CAE): 2D and 3D mutual-scoring distances reinforce each other.

An anomaly visible in only one modality (a stain has no shape, a dent no colour) is a low score in the other.
CAE brings each token's per-reference distances across to the other modality through the pixel registration
(3D group centres fall inside 2D patches), puts them on the receiving modality's value scale by *rank matching*,
keeps the larger of own and carried-over distance, weights it by a confidence, and averages with the original.

Written from the official ``compute_scores_multiple`` (HUST-SLOW/MuSc-V2, ``models/modules/_MSM.py``); each step
below names the official quantity. Rank matching (``replace_sorted``) gives the k-th smallest target value the
k-th smallest source value; tied targets share the mean of their source values (see :func:`rank_match`).
"""

from __future__ import annotations

import torch

from mmiad.methods.musc.msm import interval_average, patch_to_sample_distances


def rank_match(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``target``'s ordering with ``source``'s values (1-D): the k-th smallest target gets the k-th smallest source.

    Tied targets share the mean of the source values over their ranks. The official ``replace_sorted`` leaves
    ties to an unstable sort, so its result depends on where equal values sit, i.e. on the order of the samples in
    the batch (ties are common: identical background patches give equal distances); averaging makes it
    order-free and equals the official result whenever there is no tie.
    """
    ordered_target, order = torch.sort(target, stable=True)
    ordered_source = torch.sort(source).values
    group = torch.cumsum(
        torch.cat([ordered_target.new_zeros(1, dtype=torch.long), (ordered_target.diff() != 0).long()]), 0
    )
    sums = torch.zeros(int(group[-1]) + 1, dtype=ordered_source.dtype, device=ordered_source.device)
    sums.index_add_(0, group, ordered_source)
    counts = torch.bincount(group).to(ordered_source.dtype)
    out = torch.empty_like(ordered_source)
    out[order] = (sums / counts)[group]
    return out


def patch_members(centre_pixels: torch.Tensor, image_size: int, grid: tuple[int, int]) -> torch.Tensor:
    """(G,) index of the 2D patch each 3D group centre falls in (official ``point2patch``).

    Args:
        centre_pixels: Flat pixel index (row·S + col) of each centre on the S×S model input.
        image_size: S.
        grid: (h, w) of the 2D token grid; a patch covers ``S // w`` pixels per side, as in the official code.
    """
    patch = image_size // grid[1]
    rows, cols = centre_pixels // image_size, centre_pixels % image_size
    return (rows // patch).clamp(max=grid[0] - 1) * grid[1] + (cols // patch).clamp(max=grid[1] - 1)


def cross_modal_distances(
    d2: torch.Tensor, d3: torch.Tensor, centre_patch: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Carry per-reference distances across modalities (official ``cross_modal_align``).

    Returns:
        ``(d2x (L2,R), d3x (G,R))``: for each patch the mean over the centres inside it (0 where none is: those
        patches take no 3D evidence), and for each centre the distances of its patch.
    """
    counts = torch.bincount(centre_patch, minlength=d2.shape[0]).to(d3.dtype)
    sums = torch.zeros_like(d2).index_add_(0, centre_patch, d3)
    d2x = sums / counts.clamp(min=1).unsqueeze(1)
    return d2x, d2[centre_patch]


def _spread(distances: torch.Tensor) -> torch.Tensor:
    """Per-row (unbiased) standard deviation over references, computed in a canonical order."""
    return torch.sort(distances, dim=1).values.std(dim=1)


def enhance(own: torch.Tensor, carried: torch.Tensor, nonzero_rows: torch.Tensor | None = None) -> torch.Tensor:
    """One modality's CAE: rescale, keep the larger, weight by confidence, rescale back, average with ``own``.

    Args:
        own: (L,R) this modality's distances (official ``patch2image_*_org``).
        carried: (L,R) the other modality's distances carried over (``patch2image_*_cross``).
        nonzero_rows: For 2D, the patches that received 3D evidence; the others keep zeros when rescaled.
    """
    # Confidence: 1 − (spread of own distances, reordered by the spread of the carried ones). Rows are sorted
    # before the standard deviation so its float rounding, and thus the rank matching, ignores sample order.
    confidence = 1 - rank_match(_spread(own), _spread(carried))
    if nonzero_rows is None:
        rescaled = rank_match(own.reshape(-1), carried.reshape(-1)).view_as(own)
    else:
        rescaled = carried.clone()
        if nonzero_rows.any():
            rows = own.shape[1]
            picked = rank_match(own[nonzero_rows].reshape(-1), carried[nonzero_rows].reshape(-1))
            rescaled[nonzero_rows] = picked.view(-1, rows)
    boosted = torch.maximum(own, rescaled) * confidence.unsqueeze(1)
    boosted = rank_match(own.reshape(-1), boosted.reshape(-1)).view_as(own)
    return (own + boosted) / 2


def cae_scores(
    tokens_2d: torch.Tensor,
    valid_2d: torch.Tensor,
    tokens_3d: torch.Tensor,
    valid_3d: torch.Tensor,
    centre_patches: list[torch.Tensor],
    *,
    interval: float = 0.3,
    chunk_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,L2) and (N,G) scores of one layer with CAE (the official ``MSM_multiple``).

    ``centre_patches[i]`` is :func:`patch_members` of sample i's valid 3D tokens; every sample must have at least
    one (the token extraction refuses an empty cloud in the 3D modes). The interval keeps
    ``max(1, int(R·interval))`` references, as the official multimodal code (the batch check makes it ≥ 1).
    """
    scores_2d = torch.zeros(valid_2d.shape, dtype=torch.float32, device=tokens_2d.device)
    scores_3d = torch.zeros(valid_3d.shape, dtype=torch.float32, device=tokens_3d.device)
    for index in range(tokens_2d.shape[0]):
        d2 = patch_to_sample_distances(tokens_2d, valid_2d, index, chunk_size)
        d3 = patch_to_sample_distances(tokens_3d, valid_3d, index, chunk_size)
        d2x, d3x = cross_modal_distances(d2, d3, centre_patches[index])
        nonzero = d2x.sum(dim=1) != 0
        scores_2d[index, valid_2d[index]] = interval_average(enhance(d2, d2x, nonzero), interval)
        scores_3d[index, valid_3d[index]] = interval_average(enhance(d3, d3x), interval)
    return scores_2d, scores_3d
