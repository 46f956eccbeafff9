"""CIF's structured memory: the shots' foreground patches with one cluster id each, sampled per cluster.

Each shot contributes its foreground nodes (rows of the incidence with a membership) with a hard id, the
lowest-index hyperedge they belong to. The first shot's ids are kept; a later shot's hyperedges are matched one by
one (independent argmaxes, many-to-one allowed) to the bank cluster with the most cosine-similar feature, its
nodes relabelled, and the bank's cluster features recomputed as plain member means. After the last shot a greedy
coreset runs *inside each cluster*, so the memory keeps every kind of structure, in proportion to its size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from mmiad.methods.cif.hypergraph import hard_ids
from mmiad.methods.memorybank.coreset import greedy_coreset


def cluster_means(rows: torch.Tensor, ids: torch.Tensor, n_clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(K×D mean feature per cluster id, K bool: the cluster has a member); empty clusters get a zero row."""
    counts = torch.zeros(n_clusters, dtype=rows.dtype, device=rows.device).index_add_(
        0, ids, torch.ones_like(ids, dtype=rows.dtype)
    )
    sums = torch.zeros(n_clusters, rows.shape[1], dtype=rows.dtype, device=rows.device).index_add_(0, ids, rows)
    return sums / counts.clamp_min(1).unsqueeze(1), counts > 0


@dataclass
class ClusterBank:
    """The unsampled memory of one modality while shots are added (see :meth:`add`).

    Attributes:
        n_clusters: K, the number of cluster ids.
        rows: Per shot, its foreground node features.
        ids: Per shot, their (aligned) cluster ids.
        edges: K×D cluster features the next shot is matched against (None before the first shot).
    """

    n_clusters: int
    rows: list[torch.Tensor] = field(default_factory=list)
    ids: list[torch.Tensor] = field(default_factory=list)
    edges: torch.Tensor | None = None

    def add(self, features: torch.Tensor, incidence: torch.Tensor, edge_features: torch.Tensor) -> None:
        """Append one shot: N×D features, its N×K incidence, its K×D hyperedge features (this modality's).

        The first shot sets the ids and the cluster features (its own X_E); later shots are relabelled through the
        best cosine match of their hyperedge features, then every cluster feature becomes the mean of its members.
        """
        keep = incidence.sum(dim=1) > 0
        ids = hard_ids(incidence[keep])
        if self.edges is None:
            self.edges = edge_features.clone()
        else:
            similarity = F.cosine_similarity(edge_features.unsqueeze(1), self.edges.unsqueeze(0), dim=2)
            ids = similarity.argmax(dim=1)[ids]
        self.rows.append(features[keep])
        self.ids.append(ids)
        if len(self.rows) > 1:
            self.edges = cluster_means(torch.cat(self.rows), torch.cat(self.ids), self.n_clusters)[0]

    @property
    def size(self) -> int:
        """Nodes collected so far."""
        return sum(int(r.shape[0]) for r in self.rows)

    def all(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(M×D features, M ids) of every collected node."""
        if not self.rows:
            raise ValueError("the memory has no node: no training image had a foreground patch")
        return torch.cat(self.rows), torch.cat(self.ids)


def sampling_rate(ratio: float, shots: int, patches_per_image: int, foreground_nodes: int) -> float:
    """The official keep rate: ``min(ratio·shots·patches, n_fg) / n_fg`` (10 % of *all* patches, not of the fg)."""
    if foreground_nodes < 1:
        raise ValueError("no foreground node to sample")
    return min(ratio * shots * patches_per_image, foreground_nodes) / foreground_nodes


def minimax_centre(rows: torch.Tensor) -> int:
    """Index of the row with the smallest largest Euclidean distance to the others (the cluster's centre)."""
    if rows.shape[0] == 1:
        return 0
    distances = torch.cdist(rows.double(), rows.double())
    return int(distances.max(dim=1).values.argmin())


def cluster_allocation(ids: torch.Tensor, n_clusters: int, rate: float) -> dict[int, int]:
    """Nodes to keep per non-empty cluster: ``max(1, round(n_c/n · max(1, int(n·rate))))`` (Python rounding)."""
    total = int(ids.numel())
    target = max(1, int(total * rate))
    counts = torch.bincount(ids, minlength=n_clusters).tolist()
    return {c: max(1, round(n_c / total * target)) for c, n_c in enumerate(counts) if n_c > 0}


def sample_per_cluster(
    rows: torch.Tensor, ids: torch.Tensor, n_clusters: int, rate: float, *, eps: float = 0.9, seed: int = 0
) -> torch.Tensor:
    """Sorted indices of the rows kept: per cluster, its minimax centre when one node is allotted, else the greedy
    k-centre coreset (:func:`~mmiad.methods.memorybank.coreset.greedy_coreset`, projection ``eps``)."""
    kept: list[torch.Tensor] = []
    for cluster, count in cluster_allocation(ids, n_clusters, rate).items():
        members = torch.nonzero(ids == cluster, as_tuple=True)[0]
        if count == 1 or members.numel() == 1:
            centre = minimax_centre(rows[members])
            kept.append(members[centre : centre + 1])
            continue
        chosen = greedy_coreset(rows[members].float(), min(count, int(members.numel())), eps=eps, seed=seed)
        kept.append(members[chosen])
    return torch.sort(torch.cat(kept)).values
