"""Re-scoring with Constrained Neighbourhood (RsCon): image scores smoothed over the most similar samples.

A normal sample with one odd patch gets a high max-score; its nearest samples in feature space are normal and
pull it down, while a defective sample's neighbours tend to share its high score. Written from the official
``_RsCon.py`` (``WMO``): scores are min-max normalised over the batch; for each window size k in ``k_list``
(official 1 and 7; 1 is always added) every sample's new score is the similarity-weighted mean of the scores of
its k most similar samples (itself included); the results are averaged over k. The similarity is the dot product
of the samples' *anomaly-salient* features: the aggregated token feature at the maximum of each anomaly map.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def rescore(scores: torch.Tensor, features: torch.Tensor, k_list: Sequence[int] = (1, 7)) -> torch.Tensor:
    """(N,) re-scored image scores; ``k_list`` containing 0 (or empty) returns the scores unchanged (official).

    A window larger than the batch is clamped to it (the official code fails there); ties between equal
    similarities are broken by sample order.
    """
    if not k_list or 0 in k_list:
        return scores.clone()
    windows = sorted(set(k_list) | {1})
    span = scores.max() - scores.min()
    normalised = (scores - scores.min()) / span if span > 0 else torch.zeros_like(scores)
    similarity = features.double() @ features.double().T
    results = []
    for k in windows:
        k = min(k, scores.shape[0])
        top = torch.topk(similarity, k, dim=1, largest=True, sorted=True).indices
        kept = torch.zeros_like(similarity).scatter_(1, top, torch.gather(similarity, 1, top))
        results.append((kept / kept.sum(dim=1, keepdim=True)) @ normalised.double())
    return torch.stack(results, dim=1).mean(dim=1).to(scores.dtype)
