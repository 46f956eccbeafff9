from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmiad.data.mvtec3d import list_records
from mmiad.engine import (
    calibration_split,
    evaluate_run,
    extend_run,
    load_trained,
    model_for,
    run_models,
    served_categories,
    train_run,
)
from mmiad.methods.modelfile import ModelFileError

TINY = {"image_size": 64, "grid_size": 32, "epochs": 2, "batch_size": 2}


def test_calibration_uses_validation_then_a_holdout(tiny_dataset: Path, tmp_path: Path) -> None:
    errors: list = []
    train = list_records(tiny_dataset, "puck", "train")
    kept, calibration, source = calibration_split(tiny_dataset, "puck", train, errors)
    assert source == "validation" and kept == train and all(r.split == "validation" for r in calibration)
    (tmp_path / "none").mkdir()
    kept, calibration, source = calibration_split(tmp_path, "none", train, errors)
    assert source == "train-holdout" and len(calibration) == 1 and calibration[0] not in kept


def test_unified_run_serves_every_category_and_stores_few_shot_draws(tiny_dataset: Path, tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    files, errors = train_run(
        "cfm", tiny_dataset, tmp_path / "run", unified=True, shots=3, seed=5, hparams=TINY, cache_dir=cache
    )
    assert list(files) == ["unified"] and errors == []
    models = run_models(tmp_path / "run")
    assert model_for(models, "puck") == model_for(models, "block") == tmp_path / "run" / "unified.safetensors"
    trained = load_trained(files["unified"], cache_dir=cache)
    assert trained.info["categories"] == ["block", "puck"]
    draws = trained.info["few_shot"]
    assert set(draws) == {"block", "puck"} and all(len(d["indices"]) == 3 for d in draws.values())
    assert trained.model.n_train_samples_ == 6
    assert trained.thresholds is not None and trained.thresholds.source == "validation"
    index = json.loads((tmp_path / "run" / "run.json").read_text())
    assert index["unified"] is True and index["categories"] == ["block", "puck"]
    result, _ = evaluate_run(tmp_path / "run", tiny_dataset, cache_dir=cache)
    assert set(result["per_category"]) == {"block", "puck"}


def test_model_for_unknown_category_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="no model for category 'x'"):
        model_for({"a": tmp_path / "a.safetensors"}, "x")


def test_add_categories_extends_a_unified_run(tiny_dataset: Path, tmp_path: Path, tiny_hparams: dict) -> None:
    cache = str(tmp_path / "cache")
    run = tmp_path / "run"
    train_run(
        "unircm", tiny_dataset, run, categories=["puck"], unified=True, hparams=tiny_hparams["unircm"], cache_dir=cache
    )
    before = load_trained(run / "unified.safetensors", cache_dir=cache)
    codes_before = before.model.state_tensors()["orq_2d.0"].shape[0]
    # A unified model is tested on the categories it learnt, not on every category of the dataset.
    assert served_categories(run, tiny_dataset) == ["puck"]
    assert served_categories(run, tiny_dataset, ["block"]) == ["block"]
    path, errors = extend_run(run, tiny_dataset, ["block"], epochs=1, cache_dir=cache)
    after = load_trained(path, cache_dir=cache)
    assert errors == [] and after.info["categories"] == ["puck", "block"]
    assert after.model.state_tensors()["orq_2d.0"].shape[0] > codes_before
    assert json.loads((run / "run.json").read_text())["categories"] == ["puck", "block"]
    assert served_categories(run, tiny_dataset) == ["block", "puck"]
    with pytest.raises(ValueError, match="nothing to add"):
        extend_run(run, tiny_dataset, ["block"], epochs=1, cache_dir=cache)


def test_adding_categories_needs_a_unified_run(tiny_dataset: Path, tmp_path: Path) -> None:
    train_run("cfm", tiny_dataset, tmp_path / "run", categories=["puck"], hparams=TINY, cache_dir=str(tmp_path))
    with pytest.raises(ModelFileError, match="needs a unified run"):
        extend_run(tmp_path / "run", tiny_dataset, ["block"], epochs=1, cache_dir=str(tmp_path))


def test_option_that_does_not_apply_is_a_clear_error(tiny_dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not apply to method 'btf'"):
        train_run("btf", tiny_dataset, tmp_path / "run", hparams={"mapping": "intramodal"})


def test_overrides_rescore_without_retraining(tiny_dataset: Path, tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    train_run("cfm", tiny_dataset, tmp_path / "run", categories=["puck"], hparams=TINY, cache_dir=cache)
    product, _ = evaluate_run(tmp_path / "run", tiny_dataset, cache_dir=cache)
    only_2d, _ = evaluate_run(tmp_path / "run", tiny_dataset, cache_dir=cache, overrides={"aggregation": "2d"})
    assert product["per_category"]["puck"]["pixel_auroc"] != only_2d["per_category"]["puck"]["pixel_auroc"]


@pytest.mark.parametrize("how", ["trained", "at test"])
def test_compat_runs_are_measured_with_the_papers_sampled_aupro(
    tiny_dataset: Path, tmp_path: Path, tiny_hparams: dict, how: str
) -> None:
    from mmiad.engine.evaluation import evaluate_predictions

    cache = str(tmp_path / "cache")
    hparams = {**tiny_hparams["btf"], "compat": how == "trained"}
    train_run("btf", tiny_dataset, tmp_path / "run", categories=["puck"], hparams=hparams, cache_dir=cache)
    overrides = {"compat": True} if how == "at test" else None
    result, _ = evaluate_run(tmp_path / "run", tiny_dataset, cache_dir=cache, overrides=overrides)
    trained = load_trained(tmp_path / "run" / "puck.safetensors", cache_dir=cache, compat=True)
    predictions = list(trained.model.predict(list_records(tiny_dataset, "puck", "test")))
    # BTF's repository samples 100 thresholds; 99 (CFM's) or the exact curve give other numbers.
    sampled = evaluate_predictions(predictions, aupro_mode="compat", num_thresholds=100)
    assert result["per_category"]["puck"] == pytest.approx(sampled, abs=1e-12)
    for other in (
        evaluate_predictions(predictions, aupro_mode="compat", num_thresholds=99),
        evaluate_predictions(predictions),
    ):
        assert other["aupro@0.3"] != pytest.approx(sampled["aupro@0.3"], abs=1e-9)
    # An explicit choice still wins.
    exact, _ = evaluate_run(tmp_path / "run", tiny_dataset, cache_dir=cache, overrides=overrides, aupro_mode="exact")
    assert exact["per_category"]["puck"] == pytest.approx(evaluate_predictions(predictions), abs=1e-12)
