from __future__ import annotations

import numpy as np
import pytest

from mmiad.postprocess.threshold import Thresholds, calibrate, threshold_for_fpr


def test_threshold_allows_exactly_the_target_fraction() -> None:
    scores = np.arange(1, 11, dtype=float)  # 1..10
    threshold = threshold_for_fpr(scores, 0.1)
    assert threshold == 9.0
    assert np.mean(scores > threshold) == pytest.approx(0.1)
    assert threshold_for_fpr(scores, 0.0) == 10.0
    assert np.mean(scores > threshold_for_fpr(scores, 0.25)) <= 0.25


def test_threshold_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="without nominal scores"):
        threshold_for_fpr([], 0.1)
    with pytest.raises(ValueError, match="max_fpr"):
        threshold_for_fpr([1.0], 1.5)


def test_calibrate_and_round_trip() -> None:
    maps = [np.full((4, 4), v, dtype=np.float32) for v in (0.0, 1.0)]
    thresholds = calibrate([0.2, 0.4, 0.6, 0.8], maps, 0.25, "validation")
    assert thresholds.image == 0.6
    assert thresholds.pixel == 1.0  # 32 pixels, 8 may exceed: all of them are ties at 1.0
    assert Thresholds.from_dict(thresholds.to_dict()) == thresholds
