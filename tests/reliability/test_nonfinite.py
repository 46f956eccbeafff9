"""Non-finite values fail closed: a NaN score, map or threshold is an error, never a "good" label."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from mmiad.cli.main import main
from mmiad.data.errors import DataError
from mmiad.data.mvtec3d import list_records
from mmiad.engine import apply_thresholds, load_trained, predict_records, run_models
from mmiad.methods.base import Prediction, finite_only
from mmiad.postprocess.threshold import Thresholds, calibrate, threshold_for_fpr


def _prediction(score: float, map_value: float = 0.0) -> Prediction:
    from mmiad.data.sample import SampleRecord

    record = SampleRecord(Path("a.png"), Path("a.tiff"), "puck", "test", "bump")
    return Prediction(record, score, np.full((4, 4), map_value, np.float32), 1, None, None)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_threshold_for_fpr_rejects_non_finite_scores(bad: float) -> None:
    # Before: NaN sorted last and became the threshold, so `score > nan` labelled everything good.
    with pytest.raises(ValueError, match="1 of 4 nominal scores are not finite"):
        threshold_for_fpr([0.1, 0.2, bad, 0.3], 0.0)
    with pytest.raises(ValueError, match="not finite"):
        calibrate([0.1, 0.2], [np.array([0.0, bad])], 0.0, "validation")


@pytest.mark.parametrize("field", ["image", "pixel"])
def test_thresholds_must_be_finite(field: str) -> None:
    good = {"image": 1.0, "pixel": 0.5, "max_fpr": 0.01, "source": "validation"}
    with pytest.raises(ValueError, match=f"thresholds.{field} must be finite"):
        Thresholds.from_dict({**good, field: math.nan})
    with pytest.raises(ValueError, match=f"thresholds.{field} must be a number"):
        Thresholds.from_dict({**good, field: "1.0"})
    with pytest.raises(ValueError, match="must be finite"):
        Thresholds(**{**good, field: math.inf})


@pytest.mark.parametrize(("score", "map_value"), [(math.nan, 0.0), (math.inf, 0.0), (0.5, math.nan)])
def test_apply_thresholds_never_labels_non_finite_as_good(score: float, map_value: float) -> None:
    thresholds = Thresholds(1.0, 1.0, 0.01, "validation")
    with pytest.raises(DataError, match="not labelled"):
        apply_thresholds(_prediction(score, map_value), thresholds)
    errors: list[DataError] = []
    kept = list(finite_only([_prediction(0.5), _prediction(score, map_value), _prediction(2.0)], errors))
    assert [p.pred_score for p in kept] == [0.5, 2.0] and len(errors) == 1
    assert str(errors[0]).startswith("a.png:")


def test_predict_records_reports_a_nan_sample_and_scores_the_rest(hostile_run, tiny_dataset: Path) -> None:
    run, cache = hostile_run
    trained = load_trained(run_models(run)["puck"], cache_dir=str(cache))
    records = list_records(tiny_dataset, "puck", "test")[:3]
    original = trained.model.score

    def poisoned(features):  # the method scores the three samples as one batch: the second one turns NaN
        results = original(features)
        if len(results) == len(records):
            results[1] = replace(results[1], score=math.nan)
        return results

    trained.model.score = poisoned  # type: ignore[method-assign]
    errors: list[DataError] = []
    predictions = list(predict_records(trained, records, errors=errors))
    assert [p.record.sample_id for p in predictions] == [records[0].sample_id, records[2].sample_id]
    assert all(p.pred_label in (0, 1) for p in predictions)
    assert len(errors) == 1 and errors[0].path.name == records[1].rgb_path.name and "nan" in errors[0].problem


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "abc"])
def test_cli_rejects_a_non_finite_threshold(value: str, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as raised:
        main(["predict", "--run", str(tmp_path), "--input", str(tmp_path), "--out", str(tmp_path / "o"),
              "--threshold", value])  # fmt: skip
    assert raised.value.code == 2
    assert "--threshold" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
