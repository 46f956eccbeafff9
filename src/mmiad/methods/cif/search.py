"""CIF's scoring against the memory: hyperedge-guided search (HGMS), global 1-NN, and the reweighted image score.

A test patch is compared with the memory twice: within the memory clusters that structurally match its own
hyperedge (the top-3 by cosine of hyperedge features), and with the whole bank. The product keeps a patch low only
when it has a close nominal match that is also in the right kind of region, which is what suppresses false
positives from look-alike parts elsewhere on the object. Background patches score 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmiad.methods.cif.hypergraph import hard_ids

#: Official score of a patch whose selected memory clusters hold no node (unreachable here: only non-empty
#: clusters are ever selected).
NO_MEMORY_SCORE = 1e6


def euclidean(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """|x|×|y| Euclidean distances as the official code computes them: √max(0, ‖x‖² − 2x·y + ‖y‖²)."""
    squared = (x * x).sum(dim=1, keepdim=True) - 2 * x @ y.T + (y * y).sum(dim=1).unsqueeze(0)
    return squared.clamp_min(0).sqrt()


def nearest_in_bank(
    features: torch.Tensor, foreground: torch.Tensor, bank: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N distances, N bank indices) of each foreground patch's nearest memory node; background rows are 0."""
    distances = torch.zeros(features.shape[0], dtype=features.dtype, device=features.device)
    locations = torch.zeros(features.shape[0], dtype=torch.long, device=features.device)
    rows = torch.nonzero(foreground.view(-1), as_tuple=True)[0]
    if rows.numel():
        best, index = euclidean(features[rows], bank.to(features)).min(dim=1)
        distances[rows], locations[rows] = best, index
    return distances, locations


def matched_clusters(
    test_edges: torch.Tensor, memory_edges: torch.Tensor, present: torch.Tensor, top: int = 3
) -> torch.Tensor:
    """K×k ids of the memory clusters most similar to each test hyperedge, k = min(top, non-empty clusters).

    Similarity is (cos + 1)/2 of the hyperedge features (a monotone map, kept for fidelity). Only clusters with a
    member are candidates: the official code remaps the ids of a bank with a missing cluster and then compares
    the remapped ids with the stored ones, which selects the wrong nodes; here ids stay the stored ones.
    """
    candidates = torch.nonzero(present, as_tuple=True)[0]
    if candidates.numel() == 0:
        raise ValueError("the memory has no cluster with a node")
    memory = F.normalize(memory_edges[candidates].to(test_edges), dim=1)
    similarity = (F.normalize(test_edges, dim=1) @ memory.T + 1) / 2
    chosen = torch.topk(similarity, min(top, int(candidates.numel())), dim=1).indices
    return candidates[chosen]


def hyperedge_search(
    features: torch.Tensor,
    incidence: torch.Tensor,
    clusters: torch.Tensor,
    bank: torch.Tensor,
    bank_ids: torch.Tensor,
) -> torch.Tensor:
    """N HGMS distances: each patch with a hyperedge (its lowest-index one, t) gets its nearest distance to the
    memory nodes whose cluster is in ``clusters[t]``; patches without a hyperedge (background) get 0."""
    scores = torch.zeros(features.shape[0], dtype=features.dtype, device=features.device)
    node_ids = hard_ids(incidence)
    bank = bank.to(features)
    bank_ids = bank_ids.to(features.device)
    for edge in range(incidence.shape[1]):
        patches = node_ids == edge
        if not bool(patches.any()):
            continue
        allowed = torch.isin(bank_ids, clusters[edge].to(bank_ids.device))
        if not bool(allowed.any()):
            scores[patches] = NO_MEMORY_SCORE
            continue
        scores[patches] = euclidean(features[patches], bank[allowed]).min(dim=1).values
    return scores


def reweighted_image_score(
    scores: torch.Tensor, locations: torch.Tensor, original: torch.Tensor, bank: torch.Tensor, n_neighbors: int = 9
) -> float:
    """CIF's PatchCore-style image score: w·s(p*), p* the highest patch.

    m* is the memory node nearest p*'s *propagated* feature (``locations``); its ``n_neighbors`` nearest memory
    nodes (m* first, clipped to the bank size) are compared with p*'s *original* feature, and
    w = 1 − softmax(those distances)[0]. Unlike :func:`~mmiad.methods.memorybank.bank.reweighted_score` (BTF,
    M3DM) m* stays in the softmax and the distances are not divided by √D, as in CIF's ``compute_anomaly_score``.
    """
    worst = int(torch.argmax(scores))
    peak = float(scores[worst])
    if n_neighbors == 1:
        return peak
    bank = bank.to(original)
    anchor = bank[int(locations[worst]) : int(locations[worst]) + 1]
    support = torch.topk(euclidean(anchor, bank), min(n_neighbors, bank.shape[0]), dim=1, largest=False).indices[0]
    distances = euclidean(original[worst : worst + 1], bank[support])[0]
    weight = 1.0 - float(torch.softmax(distances.double(), dim=0)[0])
    return weight * peak
