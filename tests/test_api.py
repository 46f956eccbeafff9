"""The public Python API: train, evaluate and predict in a few lines, with typed results."""

from __future__ import annotations

from pathlib import Path

import pytest

import mmiad


def test_public_names_resolve() -> None:
    for name in mmiad.__all__:
        assert getattr(mmiad, name) is not None
    with pytest.raises(AttributeError):
        _ = mmiad.not_a_thing


def test_train_evaluate_predict(tiny_dataset: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    run = mmiad.train(
        tiny_dataset, tmp_path / "run", categories=["puck"], cache_dir=cache, epochs=2, image_size=64, grid_size=32
    )
    assert isinstance(run, mmiad.Run) and set(run.models) == {"puck"} and run.skipped == []
    metrics = mmiad.evaluate(tiny_dataset, run=run.path, cache_dir=cache)
    assert isinstance(metrics, mmiad.Metrics) and set(metrics.per_category) == {"puck"}
    assert metrics.mean == metrics.per_category["puck"]
    assert 0.0 <= metrics.mean.pixel_auroc <= 1.0
    assert metrics.to_dict()["mean"]["aupro@0.3"] == metrics.mean.aupro_30
    assert metrics.to_dict()["mean"]["aupro@0.1"] == metrics.mean.aupro_10 is not None
    assert metrics.to_dict()["mean"]["aupro@0.05"] == metrics.mean.aupro_5 is not None
    assert metrics.to_dict()["mean"]["aupro@0.01"] == metrics.mean.aupro_1
    folder = tiny_dataset / "puck" / "test" / "stain"
    predictions = mmiad.predict(run.path, folder, cache_dir=cache)
    assert len(predictions) == len(list((folder / "rgb").iterdir()))
    assert all(isinstance(p, mmiad.Prediction) and p.pred_label in (0, 1) and not p.degraded for p in predictions)
    with pytest.raises(ValueError, match="exactly one"):
        mmiad.evaluate(tiny_dataset)
