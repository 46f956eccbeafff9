"""Which samples the gallery shows, worst first, without holding a whole test set in memory.

The worst samples are the good ones that score highest (false alarms) and the defective ones that score lowest
(misses). Only those can be the worst, so two bounded heaps of ``limit`` entries each see every prediction once
and keep just the candidates; thumbnails are made only for a sample that enters a heap.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class Candidate(Generic[T]):
    """One gallery sample: its score and label, and what the page shows of it."""

    score: float
    label: int
    item: T


@dataclass
class WorstFirst(Generic[T]):
    """Keeps the ``limit`` highest-scoring good and ``limit`` lowest-scoring defective samples seen so far."""

    limit: int
    _good: list[tuple[float, int, Candidate[T]]] = field(default_factory=list)
    _bad: list[tuple[float, int, Candidate[T]]] = field(default_factory=list)
    _seen: int = 0

    def __post_init__(self) -> None:
        if self.limit < 0:
            raise ValueError(f"--max-samples must not be negative, got {self.limit}")

    def offer(self, score: float, label: int, make_item: Callable[[], T]) -> bool:
        """Consider one sample; ``make_item`` runs only if it is kept. Samples of unknown label are not shown."""
        self._seen += 1
        if label not in (0, 1) or self.limit == 0:
            return False
        # Min-heaps on "badness": a good sample is worse the higher it scores, a defective one the lower.
        heap, key = (self._good, score) if label == 0 else (self._bad, -score)
        entry_key = (key, -self._seen)  # an earlier sample wins a tie, so the order is stable
        if len(heap) >= self.limit and entry_key <= heap[0][:2]:
            return False
        entry = (key, -self._seen, Candidate(score, label, make_item()))
        if len(heap) < self.limit:
            heapq.heappush(heap, entry)
        else:
            heapq.heapreplace(heap, entry)
        return True

    def ordered(self, threshold: float | None) -> list[Candidate[T]]:
        """The kept samples, worst first, at most ``limit`` (see :func:`worst_first`)."""
        by_arrival = sorted(self._good + self._bad, key=lambda entry: -entry[1])
        return worst_first([entry[2] for entry in by_arrival], threshold, self.limit)


def badness(score: float, label: int, threshold: float) -> float:
    """How far a sample is on the wrong side of the threshold (positive = misclassified).

    A good sample alarms when ``score > threshold`` (as ``apply_thresholds`` decides), a defective one is missed
    otherwise, so FPs and FNs are positive and the correct samples follow, closest calls first.
    """
    return score - threshold if label == 0 else threshold - score


def worst_first(candidates: list[Candidate[T]], threshold: float | None, limit: int) -> list[Candidate[T]]:
    """Order candidates worst first and keep ``limit``.

    With a calibrated threshold the order is by :func:`badness`, so every false positive and false negative comes
    before any correct sample. Without one no score can be called wrong, so the highest-scoring good and the
    lowest-scoring defective samples alternate (good first), each list in its own worst-first order. Ties keep the
    input order.
    """
    if threshold is not None:
        ranked = sorted(candidates, key=lambda c: -badness(c.score, c.label, threshold))
        return ranked[:limit]
    good = sorted((c for c in candidates if c.label == 0), key=lambda c: -c.score)
    bad = sorted((c for c in candidates if c.label == 1), key=lambda c: c.score)
    merged: list[Candidate[T]] = []
    for index in range(max(len(good), len(bad))):
        merged.extend(group[index] for group in (good, bad) if index < len(group))
    return merged[:limit]


def verdict(score: float, label: int, threshold: float | None) -> str:
    """``FP``/``FN``/``TP``/``TN`` against the threshold, or ``good``/``defective`` when there is none."""
    if threshold is None:
        return {0: "good", 1: "defective"}.get(label, "unknown")
    alarm = score > threshold
    if label == 0:
        return "FP" if alarm else "TN"
    return "TP" if alarm else "FN"
