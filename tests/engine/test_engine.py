from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mmiad.data.formats import open_dataset
from mmiad.data.mvtec3d import MVTec3D, list_records
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
    kept, calibration, source = calibration_split(MVTec3D(tiny_dataset), "puck", train, errors)
    assert source == "validation" and kept == train and all(r.split == "validation" for r in calibration)
    (tmp_path / "none").mkdir()
    kept, calibration, source = calibration_split(MVTec3D(tmp_path), "none", train, errors)
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
    dataset = open_dataset(tiny_dataset)
    assert served_categories(run, dataset) == ["puck"]
    assert served_categories(run, dataset, ["block"]) == ["block"]
    path, errors = extend_run(run, tiny_dataset, ["block"], epochs=1, cache_dir=cache)
    after = load_trained(path, cache_dir=cache)
    assert errors == [] and after.info["categories"] == ["puck", "block"]
    assert after.model.state_tensors()["orq_2d.0"].shape[0] > codes_before
    assert json.loads((run / "run.json").read_text())["categories"] == ["puck", "block"]
    assert served_categories(run, dataset) == ["block", "puck"]
    with pytest.raises(ValueError, match="nothing to add"):
        extend_run(run, tiny_dataset, ["block"], epochs=1, cache_dir=cache)


def test_adding_categories_needs_a_unified_run(tiny_dataset: Path, tmp_path: Path) -> None:
    train_run("cfm", tiny_dataset, tmp_path / "run", categories=["puck"], hparams=TINY, cache_dir=str(tmp_path))
    with pytest.raises(ModelFileError, match="needs a unified run"):
        extend_run(tmp_path / "run", tiny_dataset, ["block"], epochs=1, cache_dir=str(tmp_path))


def test_option_that_does_not_apply_is_a_clear_error(tiny_dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^mapping is not a hyperparameter of btf; valid keys: compat, "):
        train_run("btf", tiny_dataset, tmp_path / "run", hparams={"mapping": "intramodal"})


def test_overrides_rescore_without_retraining(tiny_dataset: Path, tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    train_run("cfm", tiny_dataset, tmp_path / "run", categories=["puck"], hparams=TINY, cache_dir=cache)
    product, _ = evaluate_run(tmp_path / "run", tiny_dataset, cache_dir=cache)
    only_2d, _ = evaluate_run(tmp_path / "run", tiny_dataset, cache_dir=cache, overrides={"aggregation": "2d"})
    assert product["per_category"]["puck"]["pixel_auroc"] != only_2d["per_category"]["puck"]["pixel_auroc"]


def test_test_and_predict_score_a_missing_modality_the_same_way(tiny_dataset: Path, tmp_path: Path) -> None:
    """One prediction path: ``test`` scores a sample without a point cloud by the fallback, exactly as ``predict``
    does, and every prediction says which model, modality and thresholds produced it."""
    import shutil

    import mmiad
    from mmiad.data.io import read_map, read_xyz, write_xyz
    from mmiad.data.preprocess import map_to_original

    data = tmp_path / "data"
    shutil.copytree(tiny_dataset / "puck", data / "puck")
    folder = data / "puck" / "test" / "good"
    broken = sorted((folder / "xyz").iterdir())[0]
    write_xyz(broken, np.zeros_like(read_xyz(broken)))  # the 3D sensor dropped out
    cache = str(tmp_path / "cache")
    files, _ = train_run("cfm", data, tmp_path / "run", hparams=TINY, cache_dir=cache)
    trained = load_trained(files["puck"], cache_dir=cache)
    assert trained.fallback is not None and "2d" in trained.fallback_thresholds

    maps = tmp_path / "maps"
    evaluate_run(tmp_path / "run", data, maps_dir=maps, cache_dir=cache)
    tested = json.loads((maps / "puck" / "test" / "good" / f"{broken.stem}.json").read_text())["score"]

    predictions = {p.record.stem: p for p in mmiad.predict(tmp_path / "run", folder, cache_dir=cache)}
    degraded = predictions[broken.stem]
    assert degraded.degraded and degraded.modality == "2d" and degraded.model == "puck"
    assert degraded.pred_score == pytest.approx(tested, rel=1e-6)
    np.testing.assert_allclose(
        read_map(maps / "puck" / "test" / "good" / f"{broken.stem}.tiff"),
        map_to_original(degraded.anomaly_map, degraded.geometry),
        rtol=1e-6,
    )
    assert degraded.thresholds == trained.fallback_thresholds["2d"]
    assert degraded.pred_label == int(degraded.pred_score > trained.fallback_thresholds["2d"].image)
    whole = [p for stem, p in predictions.items() if stem != broken.stem]
    assert whole and all(p.modality == "2d+3d" and p.thresholds == trained.thresholds for p in whole)

    threshold = float(np.median([p.pred_score for p in whole]))
    overridden = mmiad.predict(tmp_path / "run", folder, cache_dir=cache, threshold=threshold)
    assert all(p.thresholds.image == threshold and p.thresholds.source == "user" for p in overridden)
    assert [p.pred_label for p in overridden] == [int(p.pred_score > threshold) for p in overridden]


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
