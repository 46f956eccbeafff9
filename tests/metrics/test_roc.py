"""Image and pixel AUROC against hand-computed values and scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from mmiad.metrics import UndefinedMetricError, image_auroc, pixel_auroc


def test_image_auroc_by_hand() -> None:
    # Pairs (anomalous, normal): 0.9 beats 0.1 and 0.4; 0.3 beats 0.1, loses to 0.4 -> 3 of 4 pairs = 0.75.
    assert image_auroc([0, 0, 1, 1], [0.1, 0.4, 0.9, 0.3]) == pytest.approx(0.75)
    # A tie counts one half: 0.4 vs 0.4 -> (1 + 0.5) / 2.
    assert image_auroc([0, 0, 1], [0.1, 0.4, 0.4]) == pytest.approx(0.75)


def test_image_auroc_single_class_says_which() -> None:
    with pytest.raises(UndefinedMetricError, match=r"all 3 labels are normal \(0\)"):
        image_auroc([0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"all 2 labels are anomalous \(1\)"):
        image_auroc([1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        image_auroc([0, 1], [0.1, float("nan")])
    with pytest.raises(ValueError, match="3 image labels but 2"):
        image_auroc([0, 1, 1], [0.1, 0.2])


def test_pixel_auroc_by_hand() -> None:
    masks = [np.array([[False, True]]), np.array([[False, False, True]])]
    maps = [np.array([[0.2, 0.5]]), np.array([[0.1, 0.5, 0.6]])]
    # Anomalous {0.5, 0.6} vs normal {0.2, 0.1, 0.5}: 0.5 wins 2 and ties 1 (2.5); 0.6 wins 3 -> 5.5 / 6.
    assert pixel_auroc(masks, maps) == pytest.approx(5.5 / 6)


@pytest.mark.parametrize("seed", range(4))
def test_pixel_auroc_matches_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    masks = [rng.random((6, 8)) < 0.2 for _ in range(5)]
    maps = [np.round(rng.random((6, 8)) * 5 + mask, 0).astype(np.float32) for mask in masks]
    expected = roc_auc_score(np.concatenate([m.ravel() for m in masks]), np.concatenate([m.ravel() for m in maps]))
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)


def test_pixel_auroc_perfect_inverted_and_errors() -> None:
    masks = [np.zeros((3, 4), bool), np.eye(3, 4, dtype=bool)]
    assert pixel_auroc(masks, [m.astype(float) for m in masks]) == 1.0
    assert pixel_auroc(masks, [1.0 - m for m in masks]) == 0.0
    with pytest.raises(UndefinedMetricError, match="no anomalous pixel"):
        pixel_auroc(masks[:1], [np.zeros((3, 4))])
    with pytest.raises(ValueError, match="anomaly map 1 has shape"):
        pixel_auroc(masks, [np.zeros((3, 4)), np.zeros((4, 3))])
