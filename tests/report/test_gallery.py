"""Worst-first gallery: misclassified samples first, bounded heaps, threshold-free alternation."""

from __future__ import annotations

import pytest

from mmiad.report.gallery import Candidate, WorstFirst, badness, verdict, worst_first

# (name, score, label): with threshold 1.0, g3 (1.5) and g2 (1.2) are FPs, d1 (0.2) and d2 (0.9) FNs.
SAMPLES = [
    ("g1", 0.3, 0),
    ("g2", 1.2, 0),
    ("g3", 1.5, 0),
    ("d1", 0.2, 1),
    ("d2", 0.9, 1),
    ("d3", 2.5, 1),
    ("d4", 1.1, 1),
    ("g4", 0.95, 0),
]


def test_with_threshold_errors_come_first_by_margin() -> None:
    candidates = [Candidate(score, label, name) for name, score, label in SAMPLES]
    order = [c.item for c in worst_first(candidates, 1.0, limit=8)]
    # badness: d1 0.8, g3 0.5, g2 ~0.2, d2 ~0.1, then correct ones closest first: d4 -0.1, g4 -0.05 ...
    assert order == ["d1", "g3", "g2", "d2", "g4", "d4", "g1", "d3"]
    assert [verdict(s, label, 1.0) for _, s, label in SAMPLES[:5]] == ["TN", "FP", "FP", "FN", "FN"]
    assert badness(1.5, 0, 1.0) == pytest.approx(0.5) and badness(1.5, 1, 1.0) == pytest.approx(-0.5)


def test_without_threshold_worst_good_and_defective_alternate() -> None:
    candidates = [Candidate(score, label, name) for name, score, label in SAMPLES]
    order = [c.item for c in worst_first(candidates, None, limit=5)]
    assert order == ["g3", "d1", "g2", "d2", "g4"]
    assert verdict(0.5, 0, None) == "good"


def test_heaps_keep_only_candidates_and_build_items_lazily() -> None:
    built: list[str] = []
    gallery: WorstFirst[str] = WorstFirst(2)
    for name, score, label in SAMPLES:
        gallery.offer(score, label, lambda name=name: built.append(name) or name)
    gallery.offer(9.0, -1, lambda: "unknown")  # unknown labels are never shown
    # Built only when entering a heap: d3, d4 (less bad than d1, d2) and g4 (below g2, g3) never were.
    assert built == ["g1", "g2", "g3", "d1", "d2"]
    assert [c.item for c in gallery.ordered(1.0)] == ["d1", "g3"]
    assert [c.item for c in gallery.ordered(None)] == ["g3", "d1"]
    assert WorstFirst(0).offer(1.0, 0, lambda: "x") is False
    with pytest.raises(ValueError, match="max-samples"):
        WorstFirst(-1)


def test_ties_keep_arrival_order() -> None:
    gallery: WorstFirst[str] = WorstFirst(2)
    for name in ("a", "b", "c"):
        gallery.offer(1.0, 0, lambda name=name: name)
    assert [c.item for c in gallery.ordered(0.5)] == ["a", "b"]
