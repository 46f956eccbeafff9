"""category_metrics, summarize and format_table."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mmiad.metrics import METRIC_KEYS, category_metrics, format_table, summarize


def small_category() -> tuple[list[int], list[np.ndarray]]:
    masks = [np.zeros((5, 6), bool) for _ in range(4)]
    masks[2][1:3, 1:3] = True
    masks[3][4, 5] = True
    masks[3][0:2, 0:4] = True
    return [0, 0, 1, 1], masks


@pytest.mark.parametrize("mode", ["exact", "compat"])
def test_perfect_maps_give_one_everywhere(mode: str) -> None:
    labels, masks = small_category()
    maps = [mask.astype(np.float32) for mask in masks]
    scores = [float(m.max()) for m in maps]
    result = category_metrics(labels, scores, masks, maps, aupro_mode=mode)
    assert list(result) == list(METRIC_KEYS)
    assert result == pytest.approx(dict.fromkeys(METRIC_KEYS, 1.0), abs=1e-12)


def test_inverted_maps_give_zero() -> None:
    labels, masks = small_category()
    maps = [1.0 - mask.astype(np.float32) for mask in masks]
    result = category_metrics(labels, [1.0 - label for label in labels], masks, maps)
    assert result == pytest.approx(dict.fromkeys(METRIC_KEYS, 0.0), abs=1e-12)


def test_single_class_category_gives_nan_not_error() -> None:
    masks = [np.zeros((3, 3), bool), np.zeros((3, 3), bool)]
    maps = [np.full((3, 3), 0.1), np.full((3, 3), 0.2)]
    result = category_metrics([0, 0], [0.1, 0.2], masks, maps)
    assert all(math.isnan(value) for value in result.values())
    # Bad input still raises.
    with pytest.raises(ValueError, match="anomaly map 1 has shape"):
        category_metrics([0, 0], [0.1, 0.2], masks, [maps[0], np.zeros((2, 3))])


def test_summarize_mean_skips_missing_and_is_strict_json() -> None:
    per_category = {
        "bagel": {"image_auroc": 0.9, "pixel_auroc": 0.8, "aupro@0.3": 0.7, "aupro@0.1": 0.5, "aupro@0.01": 0.2},
        # Written before AUPRO@10%/5% existed: the missing keys are None and left out of those means only.
        "tire": {"image_auroc": math.nan, "pixel_auroc": 0.6, "aupro@0.3": 0.5, "aupro@0.01": 0.4},
    }
    result = summarize(per_category)
    assert result["per_category"]["tire"]["image_auroc"] is None
    assert result["per_category"]["tire"]["aupro@0.1"] is None and result["per_category"]["tire"]["aupro@0.05"] is None
    # image_auroc and aupro@0.1 means over bagel only; the others are plain means of two.
    expected_mean = {
        "image_auroc": 0.9,
        "pixel_auroc": 0.7,
        "aupro@0.3": 0.6,
        "aupro@0.1": 0.5,
        "aupro@0.05": None,
        "aupro@0.01": 0.3,
    }
    assert result["mean"] == pytest.approx(expected_mean)
    decoded = json.loads(json.dumps(result, allow_nan=False))
    assert decoded["per_category"]["bagel"]["aupro@0.3"] == 0.7
    all_nan = summarize({"x": dict.fromkeys(METRIC_KEYS, math.nan)})
    assert all_nan["mean"] == dict.fromkeys(METRIC_KEYS)


def test_format_table() -> None:
    result = summarize(
        {
            "cable_gland": {
                "image_auroc": 0.91234,
                "pixel_auroc": 0.5,
                "aupro@0.3": 1.0,
                "aupro@0.1": 0.75,
                "aupro@0.05": 0.5,
                "aupro@0.01": math.nan,
            },
            "foam": {
                "image_auroc": 0.5,
                "pixel_auroc": 0.25,
                "aupro@0.3": 0.0,
                "aupro@0.1": 0.25,
                "aupro@0.05": 0.0,
                "aupro@0.01": 0.125,
            },
        }
    )
    lines = format_table(result).splitlines()
    assert len({len(line) for line in lines}) == 1  # fixed width
    assert lines[0].split() == ["category", "I-AUROC", "P-AUROC", "AUPRO@30%", "AUPRO@10%", "AUPRO@5%", "AUPRO@1%"]
    assert lines[2].split() == ["cable_gland", "0.912", "0.500", "1.000", "0.750", "0.500", "-"]
    assert lines[3].split() == ["foam", "0.500", "0.250", "0.000", "0.250", "0.000", "0.125"]
    assert lines[-1].split() == ["mean", "0.706", "0.375", "0.500", "0.500", "0.250", "0.125"]


def test_pixel_maps_feed_only_the_pixel_auroc() -> None:
    labels, masks = small_category()
    rng = np.random.default_rng(0)
    maps = [rng.random(mask.shape) + 0.5 * mask for mask in masks]
    flipped = [-m for m in maps]  # the reverse ranking: P-AUROC becomes 1 − P-AUROC, AUPRO must not move
    plain = category_metrics(labels, [1.0, 2.0, 3.0, 4.0], masks, maps)
    split = category_metrics(labels, [1.0, 2.0, 3.0, 4.0], masks, maps, pixel_maps=flipped)
    assert split["pixel_auroc"] == pytest.approx(1.0 - plain["pixel_auroc"], abs=1e-12)
    assert {k: v for k, v in split.items() if k != "pixel_auroc"} == {
        k: v for k, v in plain.items() if k != "pixel_auroc"
    }
