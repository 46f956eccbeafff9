"""Image-level and pixel-level AUROC.

The pixel AUROC is computed as the Mann–Whitney statistic instead of calling scikit-learn on ~96 M concatenated
pixels: with the normal scores already sorted, each anomalous pixel only needs two binary searches to count the
normal pixels below and equal to it. It is the same number scikit-learn gives (ties count one half), computed with
exact integer counts and without an arg-sort of the whole category.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import roc_auc_score

from mmiad.metrics.pixels import PixelScores, UndefinedMetricError, check_scores_finite


def image_auroc(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve of image scores (label 1 = anomalous).

    Raises:
        ValueError: for mismatched lengths, non-finite scores or labels other than 0/1.
        UndefinedMetricError: (a ValueError) when only one class is present, saying which.
    """
    labels = np.asarray(labels).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.size != scores.size:
        raise ValueError(f"got {labels.size} image labels but {scores.size} image scores")
    if labels.size == 0:
        raise ValueError("no image labels / scores given")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"image labels must be 0 (normal) or 1 (anomalous), got values {np.unique(labels).tolist()}")
    check_scores_finite(scores, "image scores")
    n_anomalous = int(np.count_nonzero(labels == 1))
    if n_anomalous in (0, labels.size):
        only = "anomalous (1)" if n_anomalous else "normal (0)"
        raise UndefinedMetricError(
            f"image AUROC needs both normal and anomalous images, but all {labels.size} labels are {only}"
        )
    return float(roc_auc_score(labels.astype(np.int64), scores))


def pixel_auroc_from(pixels: PixelScores) -> float:
    """Pixel AUROC of pooled pixels: P(anomalous score > normal score) + ½ P(equal)."""
    pixels.require_both_classes("pixel AUROC")
    ok = pixels.ok_sorted
    below = np.searchsorted(ok, pixels.anomalous, side="left")
    not_above = np.searchsorted(ok, pixels.anomalous, side="right")
    # 2·(#below) + (#equal) = below + not_above, summed exactly in int64 before the single division.
    twice_wins = int(below.sum(dtype=np.int64)) + int(not_above.sum(dtype=np.int64))
    return twice_wins / (2.0 * pixels.anomalous.size * ok.size)


def pixel_auroc(masks: Sequence[np.ndarray], maps: Sequence[np.ndarray]) -> float:
    """AUROC over all pixels of all test images of a category (good and defective), as in the papers.

    Args:
        masks: H×W ground-truth masks (non-zero = anomalous), one per test image.
        maps: H×W anomaly maps of the same shapes.

    Raises:
        ValueError: shape mismatch (naming the index), NaN scores, or (UndefinedMetricError) a single class.
    """
    return pixel_auroc_from(PixelScores.from_maps(masks, maps))
