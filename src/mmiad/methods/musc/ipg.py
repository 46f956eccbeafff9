"""Iterative Point Grouping (IPG): Point-MAE groups that do not jump across surface discontinuities.

Point-MAE groups a centre with its k nearest points; on an edge or a thin part the kNN ball takes points from the
other side, and a normal edge looks anomalous. IPG (official ``_IPG.py``) starts a group on *curved* surface
(curvature ≥ 0.01) from only its ``step`` (80) nearest points and grows it by the points nearest to the current
group, ``step`` at a time, until it has ``group_size`` points; flat-surface groups stay plain kNN groups.

Faithful details: the search space is the centre's 2·group_size nearest points; a growth step takes the ``add``
smallest (member, candidate) distances over all pairs, so a candidate close to two members can be taken twice and
the group then holds a duplicate (the Mini-PointNet's max-pool is insensitive to duplicates, but the group covers
fewer distinct points); curvature is λ_min / Σλ of the covariance of the centre's group_size−1 nearest neighbours,
offset by the centre and scaled by their largest norm.
"""

from __future__ import annotations

import torch

from mmiad.features.grouping import farthest_point_sample, knn_indices

IPG_STEP = 80
CURVATURE_THRESHOLD = 0.01


def curvature(points: torch.Tensor, knn: torch.Tensor) -> torch.Tensor:
    """(G,) λ_min/Σλ of each centre's neighbourhood; ``knn`` (G,K) lists the centre first, then K−1 neighbours."""
    size = knn.shape[1]
    if size < 3:
        return torch.zeros(knn.shape[0])
    centre = points[knn[:, 0]]
    offsets = points[knn[:, 1:]] - centre[:, None]
    scale = offsets.norm(dim=2).amax(dim=1).clamp(min=1e-12)
    offsets = offsets / scale[:, None, None]
    offsets = offsets - offsets.mean(dim=1, keepdim=True)
    covariance = offsets.transpose(1, 2) @ offsets / (size - 2)
    eigen = torch.linalg.eigvalsh(covariance.double())
    total = eigen.sum(dim=1)
    return torch.where(total > 0, eigen[:, 0] / total.clamp(min=1e-30), torch.zeros_like(total)).float()


def _grow(points: torch.Tensor, members: torch.Tensor, search: torch.Tensor, add: int) -> torch.Tensor:
    """``add`` new members per group: the candidates of the smallest (member, candidate) distances."""
    excluded = (search[:, :, None] == members[:, None, :]).any(dim=2)  # (H, S)
    dist = torch.cdist(points[members], points[search])  # (H, m, S)
    dist.masked_fill_(excluded[:, None, :], float("inf"))
    flat = torch.topk(dist.reshape(dist.shape[0], -1), add, dim=1, largest=False, sorted=True).indices
    return torch.gather(search, 1, flat % search.shape[1])


def iterative_groups(
    points: torch.Tensor,
    centre_idx: torch.Tensor,
    group_size: int,
    *,
    step: int = IPG_STEP,
    threshold: float = CURVATURE_THRESHOLD,
) -> tuple[torch.Tensor, torch.Tensor]:
    """IPG members (G,K) of the given centres and their curvature (G,); K = min(group_size, N)."""
    total = int(points.shape[0])
    size = min(group_size, total)
    search, _ = knn_indices(points, points[centre_idx], min(2 * size, total))
    bends = curvature(points, search[:, :size])
    members = search[:, :size].clone()
    curved = torch.nonzero(bends >= threshold)[:, 0]
    if curved.numel() and step < size:
        grown = search[curved, :step]
        while grown.shape[1] < size:
            new = _grow(points, grown, search[curved], min(step, size - grown.shape[1]))
            grown = torch.cat([new, grown], dim=1)
        members[curved] = grown
    return members, bends


def make_grouping(use_ipg: bool, step: int = IPG_STEP, threshold: float = CURVATURE_THRESHOLD):
    """A :data:`~mmiad.features.grouping.GroupingFn` (FPS centres + IPG or kNN members) that records curvature.

    The returned callable has a ``curvature`` attribute holding the (G,) curvature of its last call: SNAMD needs it
    whether or not IPG forms the groups.
    """

    def grouping(points: torch.Tensor, num_group: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        count = min(num_group, int(points.shape[0]))
        centre_idx = torch.from_numpy(farthest_point_sample(points.numpy(), count))
        if use_ipg:
            members, bends = iterative_groups(points, centre_idx, group_size, step=step, threshold=threshold)
        else:
            members, _ = knn_indices(points, points[centre_idx], min(group_size, int(points.shape[0])))
            bends = curvature(points, members)
        grouping.curvature = bends  # type: ignore[attr-defined]
        return centre_idx, members

    grouping.curvature = torch.zeros(0)  # type: ignore[attr-defined]
    return grouping
