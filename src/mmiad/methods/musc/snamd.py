"""Similarity Neighbourhood Aggregation with Multi-Degrees (SNAMD): tokens pooled with their similar neighbours.

A patch alone is noisy; averaging it with its neighbours at several *degrees* (window sizes ``r_list``, official
1, 3, 5) makes small and large defects both stand out. Neighbours are weighted by ``exp(−‖f_n − f_centre‖)``, so a
neighbour across an edge (dissimilar) contributes little. Written from the official ``_SNAMD.py``.

2D: r×r windows on the patch grid, zero padded at the border as the official ``Unfold``; the degrees are
averaged; the result is L2-normalised afterwards (by the caller's pipeline, as the official code).

3D: the r nearest group *centres* (r = 1, 3, 5 neighbours, the first being the centre itself). On flat surface
(curvature < 0.01) the aggregated feature is used, on curved surface the token's own feature (aggregation there
would mix the two sides of an edge). How the degrees are combined differs between paper and code:

* ``"official"`` (default): the official code flattens the D degree features to one D·C vector and
  ``adaptive_avg_pool1d``-s it back to C, which averages *adjacent channels*: output channel j is the mean of
  flat entries [jD, jD+D), so the first third of the channels comes from degree 1 (channel-pooled), the second
  third from degree 3, the last from degree 5.
* ``"degrees"`` (paper-literal): the mean over degrees, channel by channel, as in 2D.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmiad.features.grouping import knn_indices

SNAMD_3D_POOLS = ("official", "degrees")


def _check_r_list(r_list: tuple[int, ...]) -> None:
    if not r_list or any(r < 1 or r % 2 == 0 for r in r_list):
        raise ValueError(f"r_list must hold odd positive degrees (official 1, 3, 5), got {r_list}")


def aggregate_2d(features: torch.Tensor, r_list: tuple[int, ...] = (1, 3, 5)) -> torch.Tensor:
    """(C,h,w) patch features → (h·w, C) aggregated (not yet normalised), the official ``_embed_2d``."""
    _check_r_list(r_list)
    channels, height, width = features.shape
    r_max = max(r_list)
    if r_max == 1:
        return features.reshape(channels, -1).T.contiguous()
    windows = F.unfold(features[None].float(), kernel_size=r_max, padding=(r_max - 1) // 2)
    windows = windows.view(channels, r_max, r_max, height * width)  # zero-padded neighbourhoods
    centre = r_max // 2
    weights = torch.exp(-(windows - windows[:, centre : centre + 1, centre : centre + 1]).norm(dim=0))
    degrees = []
    for r in r_list:
        lo, hi = centre - (r - 1) // 2, centre + (r - 1) // 2 + 1
        sub_w = weights[lo:hi, lo:hi]
        pooled = (windows[:, lo:hi, lo:hi] * sub_w).sum(dim=(1, 2)) / sub_w.sum(dim=(0, 1))
        degrees.append(pooled)
    return torch.stack(degrees).mean(dim=0).T.contiguous()


def aggregate_3d(
    features: torch.Tensor,
    centres: torch.Tensor,
    curvature: torch.Tensor,
    r_list: tuple[int, ...] = (1, 3, 5),
    *,
    pool: str = "official",
    curvature_threshold: float = 0.01,
) -> torch.Tensor:
    """(G,C) unit-normalised group features → (G,C) aggregated over nearest centres, the official ``_embed_3d``."""
    _check_r_list(r_list)
    if pool not in SNAMD_3D_POOLS:
        raise ValueError(f"unknown SNAMD 3D pooling {pool!r}; expected one of {SNAMD_3D_POOLS}")
    count = int(features.shape[0])
    r_max = min(max(r_list), count)
    if max(r_list) == 1 or count == 0:
        return features.float().clone()
    neighbours, _ = knn_indices(centres.float(), centres.float(), r_max)
    gathered = features.float()[neighbours]  # (G, r, C); column 0 is the nearest centre (the token itself)
    own = gathered[:, 0]
    weights = torch.exp(-(gathered - own[:, None]).norm(dim=2))  # (G, r)
    degrees = []
    for r in r_list:
        r = min(r, r_max)
        sub_w = weights[:, :r]
        degrees.append((gathered[:, :r] * sub_w[..., None]).sum(dim=1) / sub_w.sum(dim=1, keepdim=True))
    stacked = torch.stack(degrees, dim=1)  # (G, D, C)
    if pool == "official":
        depth = stacked.shape[1]
        low = stacked.reshape(count, -1).view(count, -1, depth).mean(dim=2)
    else:
        low = stacked.mean(dim=1)
    flat = curvature < curvature_threshold
    return torch.where(flat[:, None], low, own)
