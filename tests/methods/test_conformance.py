"""One suite every registered method must pass: fit, predict, determinism, save/load round trip."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from mmiad.data.mvtec3d import list_records
from mmiad.engine import TrainedModel, load_trained, save_trained
from mmiad.methods.base import NotFittedError
from mmiad.methods.registry import available_methods, get_method


@pytest.fixture(scope="module")
def records(tiny_dataset: Path) -> tuple[list, list]:
    return list_records(tiny_dataset, "puck", "train"), list_records(tiny_dataset, "puck", "test")


TRAINED = [name for name in available_methods() if get_method(name).needs_training]
ZERO_SHOT = [name for name in available_methods() if not get_method(name).needs_training]


@pytest.mark.parametrize("name", TRAINED)
def test_method_contract(name: str, records, tmp_path: Path, tiny_hparams: dict) -> None:
    train, test = records
    method = get_method(name)
    model = method(cache_dir=str(tmp_path / "cache"), **tiny_hparams.get(name, {}))
    with pytest.raises(NotFittedError):
        list(model.predict(test))
    assert model.fit(train) is model
    predictions = list(model.predict(test))
    assert len(predictions) == len(test)
    for prediction in predictions:
        assert prediction.anomaly_map.shape == (64, 64)
        assert np.isfinite(prediction.pred_score) and np.isfinite(prediction.anomaly_map).all()
        assert prediction.label in (0, 1) and prediction.gt_mask is not None
    # Same seed, same data → identical learned state.
    again = method(cache_dir=str(tmp_path / "cache"), **tiny_hparams.get(name, {})).fit(train)
    first_state, second_state = model.state_tensors(), again.state_tensors()
    assert first_state.keys() == second_state.keys()
    assert all(torch.equal(first_state[k], second_state[k]) for k in first_state)
    # Save → load gives the same scores.
    path = save_trained(tmp_path / "model.safetensors", TrainedModel(model, None, {"category": "puck"}))
    loaded = load_trained(path, cache_dir=str(tmp_path / "cache"))
    reloaded = list(loaded.model.predict(test))
    np.testing.assert_allclose([p.pred_score for p in reloaded], [p.pred_score for p in predictions], rtol=1e-6)
    assert loaded.info["category"] == "puck"


@pytest.mark.parametrize("name", ZERO_SHOT)
def test_zero_shot_contract(name: str, records, tmp_path: Path, tiny_hparams: dict) -> None:
    """A zero-shot method scores a batch with no fit, every sample, deterministically, whatever the order."""
    _, test = records
    method = get_method(name)
    model = method(cache_dir=str(tmp_path / "cache"), **tiny_hparams.get(name, {}))
    predictions = list(model.predict(test))
    assert [p.record for p in predictions] == test  # the user's records, in order
    for prediction in predictions:
        assert prediction.anomaly_map.shape == (64, 64)
        assert np.isfinite(prediction.pred_score) and np.isfinite(prediction.anomaly_map).all()
    again = list(method(cache_dir=str(tmp_path / "cache"), **tiny_hparams.get(name, {})).predict(test[::-1]))[::-1]
    np.testing.assert_allclose([p.pred_score for p in again], [p.pred_score for p in predictions], rtol=1e-5)


@pytest.mark.parametrize("name", TRAINED)
def test_user_hyperparameters_round_trip_unchanged(name: str, records, tmp_path: Path, tiny_hparams: dict) -> None:
    """``compat`` is resolved when the model runs, never by rewriting the config: what the user set is saved."""
    train, _ = records
    method = get_method(name)
    hparams = {**tiny_hparams[name], "compat": True}
    model = method(cache_dir=str(tmp_path / "cache"), **hparams)
    given = dataclasses.asdict(model.config)
    assert {k: given[k] for k in hparams} == {k: (tuple(v) if isinstance(v, list) else v) for k, v in hparams.items()}
    defaults = {f.name: f.default for f in dataclasses.fields(method.config_class)}
    for key, official in model.config.compat_values().items():
        assert given[key] == defaults[key]  # the user's (default) value is kept in the config...
        assert getattr(model.settings, key) == official  # ...and the official one is what runs
    model.fit(train)
    path = save_trained(tmp_path / "model.safetensors", TrainedModel(model, None, {"category": "puck"}))
    loaded = load_trained(path, cache_dir=str(tmp_path / "cache"))
    assert dataclasses.asdict(loaded.model.config) == given
