"""Mutual Scoring Mechanism (MSM): the samples of an unlabeled batch score each other, in bounded memory.

For a token (2D patch or 3D group) of sample i and every other sample j, the score keeps the distance to the
token of j nearest to it: a normal token finds a close match in almost every other sample, an anomalous one in few.
The "interval average" then averages the smallest ``interval`` fraction (official: 30 %) of those per-sample
distances, so the few other samples that share the same defect cannot hide it.

The work is O(N²·L²·C) for N samples of L tokens. It is done one query sample at a time against blocks of at most
``chunk_size`` reference samples, so the largest temporary is L × chunk_size·L distances (40 MB for 784 patches and
16 references) whatever the batch size; the result does not depend on the chunking beyond float rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from mmiad.data.errors import DataError


class BatchTooSmallError(DataError):
    """A batch (or subset) has too few samples for mutual scoring."""


class MixedSizeError(DataError):
    """The samples of a batch do not share one token grid, so they cannot score each other."""


def references_kept(num_references: int, interval: float) -> int:
    """How many of the R per-reference distances the interval average keeps: ``int(R · interval)`` (official)."""
    return int(num_references * interval)


def minimum_batch(interval: float = 0.3) -> int:
    """The smallest batch that mutual scoring accepts.

    Each sample needs at least one kept reference (``int((N−1)·interval) ≥ 1``; the official single-modality
    code silently averages an empty set otherwise) and CAE's standard deviation over references needs two. With the
    official interval 0.3 the minimum is 5 samples.
    """
    if not 0.0 < interval <= 1.0:
        raise ValueError(f"interval must be in (0, 1], got {interval}")
    size = 3
    while references_kept(size - 1, interval) < 1:
        size += 1
    return size


def check_batch(size: int, interval: float, what: str = "batch") -> None:
    """Raise :class:`BatchTooSmallError` when ``size`` samples cannot score each other."""
    needed = minimum_batch(interval)
    if size < needed:
        raise BatchTooSmallError(
            None,
            f"mutual scoring needs at least {needed} samples per {what} (interval {interval}: each sample keeps "
            f"int((N-1)*{interval}) >= 1 other samples), got {size}; score a larger batch or use fewer subsets",
        )


def stack_tokens(tokens: Sequence[torch.Tensor], what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad per-sample (L_i, C) token sets into (N, L, C) plus an (N, L) validity mask.

    3D token counts may differ (a small cloud forms fewer groups); the channel count may not.
    """
    widths = {int(t.shape[1]) for t in tokens}
    if len(widths) != 1:
        raise MixedSizeError(None, f"{what} tokens have different channel counts {sorted(widths)}")
    longest = max(int(t.shape[0]) for t in tokens)
    stacked = torch.zeros(len(tokens), longest, widths.pop(), dtype=torch.float32)
    valid = torch.zeros(len(tokens), longest, dtype=torch.bool)
    for index, sample in enumerate(tokens):
        stacked[index, : sample.shape[0]] = sample.float()
        valid[index, : sample.shape[0]] = True
    return stacked, valid


def _block_min_distances(query: torch.Tensor, refs: torch.Tensor, ref_valid: torch.Tensor) -> torch.Tensor:
    """(Lq, B): for each query token, the L2 distance to the nearest valid token of each of B reference samples."""
    # One batched distance matrix per reference: each is computed the same way wherever the reference sits in
    # the batch, so scores do not depend on sample order even through CAE's rank matching (which would turn a
    # last-bit difference between two near-equal distances into a swap of two values).
    blocks = refs.shape[0]
    dist = torch.cdist(query.unsqueeze(0).expand(blocks, -1, -1), refs)  # (B, Lq, L)
    dist.masked_fill_(~ref_valid.unsqueeze(1), float("inf"))
    return dist.amin(dim=2).T


def patch_to_sample_distances(
    tokens: torch.Tensor, valid: torch.Tensor, index: int, chunk_size: int = 16
) -> torch.Tensor:
    """(L_i, N−1) nearest-token distances from sample ``index`` to every other sample, in batch order.

    Only the query's valid tokens are rows; a reference with no valid token gives +inf (it never matches).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    query = tokens[index, valid[index]]
    others = [j for j in range(tokens.shape[0]) if j != index]
    columns = []
    for start in range(0, len(others), chunk_size):
        picked = torch.tensor(others[start : start + chunk_size], device=tokens.device)
        columns.append(_block_min_distances(query, tokens[picked], valid[picked]))
    return torch.cat(columns, dim=1)


def interval_average(distances: torch.Tensor, interval: float) -> torch.Tensor:
    """Mean of the ``int(R·interval)`` smallest of each row's R distances (the official [0, X%] interval)."""
    keep = references_kept(distances.shape[1], interval)
    if keep < 1:
        raise BatchTooSmallError(None, f"{distances.shape[1] + 1} samples are too few for interval {interval}")
    return torch.topk(distances, keep, dim=1, largest=False, sorted=True).values.mean(dim=1)


def mutual_scores(
    tokens: torch.Tensor, valid: torch.Tensor, *, interval: float = 0.3, chunk_size: int = 16
) -> torch.Tensor:
    """(N, L) MSM scores of one modality and one layer (the official ``MSM_single``); invalid tokens score 0."""
    check_batch(tokens.shape[0], interval)
    scores = torch.zeros(valid.shape, dtype=torch.float32, device=tokens.device)
    for index in range(tokens.shape[0]):
        distances = patch_to_sample_distances(tokens, valid, index, chunk_size)
        scores[index, valid[index]] = interval_average(distances, interval)
    return scores


def split_subsets(size: int, divide_num: int, seed: int) -> list[np.ndarray]:
    """Random disjoint subsets of ``range(size)`` (official MuSc ``divide_num``), fixed by ``seed``.

    The batch is shuffled with NumPy's generator seeded by ``seed`` and cut into ``divide_num`` nearly equal
    parts; each part is scored on its own, which divides the O(N²) work by about ``divide_num``.
    """
    if divide_num < 1:
        raise ValueError(f"divide_num must be at least 1, got {divide_num}")
    if divide_num == 1:
        return [np.arange(size)]
    order = np.random.default_rng(seed).permutation(size)
    return [np.sort(part) for part in np.array_split(order, divide_num)]


def checked_subsets(size: int, divide_num: int, seed: int, interval: float) -> list[np.ndarray]:
    """:func:`split_subsets`, with every subset's size checked before any work is done."""
    subsets = split_subsets(size, divide_num, seed)
    for subset in subsets:
        check_batch(len(subset), interval, what="subset" if divide_num > 1 else "batch")
    return subsets
