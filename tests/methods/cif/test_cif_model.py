"""CIF end to end: the memory the model builds, how it scores, and the CLI with --shots 1."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mmiad.cli.main import main
from mmiad.data.mvtec3d import list_records
from mmiad.engine import load_trained
from mmiad.methods.cif.config import CIFConfig, clusters_for
from mmiad.methods.cif.model import CIF, fuse_maps


@pytest.fixture(scope="module")
def fitted(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[CIF, list]:
    cache = tmp_path_factory.mktemp("cif_cache")
    train = list_records(tiny_dataset, "puck", "train")[:2]
    return CIF(cache_dir=str(cache), image_size=64).fit(train), list_records(tiny_dataset, "puck", "test")


def test_the_fitted_memory(fitted: tuple[CIF, list]) -> None:
    model, _ = fitted
    assert model.n_shots_ == 2 and model.n_clusters_ == 4 and model.grid_ == 8
    assert model.foreground_rules_ == ["corner_plane"]  # raw synthetic MVTec-layout clouds
    for name in ("rgb", "xyz"):
        rows, ids = model.banks_[name]
        assert rows.shape[0] == ids.shape[0] > 0 and int(ids.min()) >= 0 and int(ids.max()) < 4
        assert torch.isfinite(rows).all()


def test_one_shot_bank_size_is_the_official_allocation(tiny_dataset: Path, tmp_path: Path) -> None:
    """One shot (no alignment): the kept nodes per cluster are exactly the proportional allocation of the
    shot's foreground nodes by their lowest-index hyperedge, at the 10 %-of-all-patches rate."""
    model = CIF(cache_dir=str(tmp_path), image_size=64, sampling_ratio=0.03)
    record = list_records(tiny_dataset, "puck", "train")[:1]
    model.fit(record)
    patches = model._patches(model.pipeline.extract(model.pipeline.preprocess(record)[0]))
    incidence = model._incidence(patches).numpy()
    stored = incidence[incidence.sum(axis=1) > 0]
    hard = np.array([np.flatnonzero(row)[0] for row in stored])
    rate = min(0.03 * 64, len(hard)) / len(hard)
    assert rate < 1
    target = max(1, int(len(hard) * rate))
    expected = [max(1, round(np.sum(hard == c) / len(hard) * target)) if np.any(hard == c) else 0 for c in range(4)]
    for name in ("rgb", "xyz"):  # the XYZ memory has the same node set and, for one shot, the same ids
        assert torch.bincount(model.banks_[name][1], minlength=4).tolist() == expected


def test_score_multiplies_the_modalities(fitted: tuple[CIF, list]) -> None:
    model, test = fitted
    features = model.pipeline.extract(model.pipeline.preprocess(test[:1])[0])
    scored = model.score([features])[0]
    patches = model._patches(features)
    incidence = model._incidence(patches)
    rgb, rgb_score = model._modality("rgb", patches.rgb, incidence, patches.foreground)
    xyz, xyz_score = model._modality("xyz", patches.xyz, incidence, patches.foreground)
    assert scored.score == pytest.approx(rgb_score * xyz_score, rel=1e-9)
    np.testing.assert_allclose(scored.modality_maps["2d"], rgb.view(8, 8).numpy())
    expected = fuse_maps(rgb.view(8, 8), xyz.view(8, 8), 64, power=1.5, smoothing="box_cascade", sigma=4.0)
    np.testing.assert_allclose(scored.anomaly_map, expected.numpy(), rtol=1e-6)
    assert not rgb[~patches.foreground].any() and not xyz[~patches.foreground].any()  # background scores 0


def test_clusters_per_dataset_and_bad_settings() -> None:
    assert clusters_for("mvtec3d", None) == 4 and clusters_for("eyecandies", None) == 8
    assert clusters_for("eyecandies", 5) == 5
    for bad in ({"foreground": "nope"}, {"hops": 0}, {"n_clusters": 0}, {"sampling_ratio": 0.0}, {"alpha": 2.0}):
        with pytest.raises(ValueError):
            CIFConfig(**bad)  # type: ignore[arg-type]


@pytest.mark.slow
def test_cli_train_test_predict_with_one_shot(tmp_path: Path) -> None:
    data, run, cache = tmp_path / "data", tmp_path / "run", str(tmp_path / "cache")
    assert main(["synth", "--out", str(data), "--preset", "tiny", "--categories", "puck", "--seed", "2"]) == 0
    train = ["train", "--method", "cif", "--data", str(data), "--out", str(run), "--shots", "1", "--image-size", "64"]
    assert main([*train, "--cache-dir", cache]) == 0
    loaded = load_trained(run / "puck.safetensors", cache_dir=cache)
    assert loaded.info["few_shot"]["shots"] == 1 and len(loaded.info["few_shot"]["indices"]) == 1
    assert loaded.model.n_shots_ == 1
    assert loaded.model.banks_["rgb"][0].shape[0] <= int(0.1 * 64) + 4  # 10 % of one 8×8 grid, ± K rounding

    metrics = tmp_path / "m.json"
    assert main(["test", "--run", str(run), "--data", str(data), "--json", str(metrics), "--cache-dir", cache]) == 0
    result = json.loads(metrics.read_text())["per_category"]["puck"]
    assert 0.0 <= result["image_auroc"] <= 1.0 and 0.0 <= result["pixel_auroc"] <= 1.0

    defect = next(p for p in (data / "puck" / "test").iterdir() if p.name != "good")
    out = tmp_path / "pred"
    assert main(["predict", "--run", str(run), "--input", str(defect), "--out", str(out), "--cache-dir", cache]) == 0
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == len(list((defect / "rgb").iterdir()))
    assert all(np.isfinite(float(row["score"])) and float(row["score"]) >= 0 for row in rows)
