"""A new method, a new dataset format and a new extractor plug in by registration alone.

Each is defined here, registered with its registry's one call, and then used through the ordinary engine entry
points (train, test, predict, the Python API) with no other change anywhere: the proof that adding one touches only
its own module plus one registration line.
"""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

import mmiad
from mmiad.data import formats as format_registry
from mmiad.data.errors import DataError
from mmiad.data.formats import DatasetFormat, open_dataset, register_format
from mmiad.data.mvtec3d import MVTec3D
from mmiad.data.sample import SampleRecord
from mmiad.engine import evaluate_run, load_trained, train_run
from mmiad.features import registry as extractor_registry
from mmiad.features.registry import build_extractors, register_image_extractor
from mmiad.methods import registry as method_registry
from mmiad.methods.base import AnomalyModel, Scored
from mmiad.methods.registry import register_method
from mmiad.methods.settings import MethodSettings


@dataclass
class DistanceSettings(MethodSettings):
    """The toy method's settings: the grid it scores on."""

    grid_size: int = 8


class DistanceToMean(AnomalyModel):
    """Toy method: a pixel's anomaly is its 2D feature's distance to the mean nominal feature."""

    config_class = DistanceSettings
    tiny_hparams: ClassVar[dict[str, Any]] = {"image_size": 64}

    def fit(self, records: Sequence[SampleRecord], *, progress: bool = False, errors: list | None = None) -> Any:
        prepared = self.pipeline.preprocess(records, errors=errors)
        rows = [f.on_grid(self.config.grid_size)[0].flatten(1).T for _, f in self.pipeline.iter_features(prepared)]
        self.mean_ = torch.cat(rows).mean(0)
        self.fitted_ = True
        return self

    def score(self, features: Sequence[Any]) -> list[Scored]:
        grid, size = self.config.grid_size, self.config.image_size
        results = []
        for sample in features:
            distance = (sample.on_grid(grid)[0].flatten(1).T - self.mean_).norm(dim=1).view(1, 1, grid, grid)
            full = torch.nn.functional.interpolate(distance, size=(size, size), mode="nearest")[0, 0].numpy()
            results.append(Scored(float(full.max()), full))
        return results

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean_}

    def load_state(self, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        self.mean_ = tensors["mean"]


class BatchOutlier(AnomalyModel):
    """Toy zero-shot method: a pixel's anomaly is its 2D feature's distance to the batch's mean feature."""

    config_class = DistanceSettings
    tiny_hparams: ClassVar[dict[str, Any]] = {"image_size": 64}
    needs_training: ClassVar[bool] = False
    whole_batch: ClassVar[bool] = True

    def fit(self, records: Sequence[SampleRecord], *, progress: bool = False, errors: list | None = None) -> Any:
        return self

    def score(self, features: Sequence[Any]) -> list[Scored]:
        grid, size = self.config.grid_size, self.config.image_size
        rows = [f.on_grid(grid)[0].flatten(1).T for f in features]
        mean = torch.cat(rows).mean(0)
        results = []
        for row in rows:
            distance = (row - mean).norm(dim=1).view(1, 1, grid, grid)
            full = torch.nn.functional.interpolate(distance, size=(size, size), mode="nearest")[0, 0].numpy()
            results.append(Scored(float(full.max()), full))
        return results

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state(self, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        pass


class FlatPairs(DatasetFormat):
    """Toy layout: a ``FLAT`` marker, then ``<category>/<split>/<defect>__<stem>.{png,tiff}`` (+ ``.mask.png``)."""

    description = "toy flat layout"
    detect_priority = 100

    @classmethod
    def detect(cls, root: Path) -> bool:
        return (root / "FLAT").is_file()

    def categories(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir())

    def records(self, category: str, split: str, *, errors: list[DataError] | None = None) -> list[SampleRecord]:
        folder = self.root / category / split
        records = []
        for rgb in sorted(folder.glob("*.png")) if folder.is_dir() else []:
            if rgb.name.endswith(".mask.png"):
                continue
            defect, _, stem = rgb.stem.partition("__")
            mask = rgb.with_name(f"{rgb.stem}.mask.png")
            records.append(
                SampleRecord(
                    rgb_path=rgb,
                    xyz_path=rgb.with_suffix(".tiff"),
                    category=category,
                    split=split,
                    defect_type=defect,
                    gt_path=mask if mask.is_file() else None,
                    label=int(defect != "good"),
                    name=stem,
                    format=self.name,
                )
            )
        return records


@pytest.fixture
def plugins() -> Iterator[None]:
    """Register the toy method, format and extractor for one test, then remove them again."""
    register_method("distance_to_mean")(DistanceToMean)
    register_method("batch_outlier")(BatchOutlier)
    register_format("flatpairs")(FlatPairs)
    register_image_extractor(
        "coarse_rgb", lambda **_: _CoarseRgb(), "mean colour per 8×8 patch (toy)", needs_weights=False
    )
    try:
        yield
    finally:
        method_registry._REGISTRY.pop("distance_to_mean", None)
        method_registry._REGISTRY.pop("batch_outlier", None)
        format_registry._FORMATS.pop("flatpairs", None)
        extractor_registry._IMAGE.pop("coarse_rgb", None)


class _CoarseRgb:
    """Toy 2D extractor: the mean of each 8×8 patch of the normalised image (3 channels, stride 8)."""

    out_channels = 3

    def config(self) -> dict[str, Any]:
        return {"name": "coarse_rgb"}

    def extract(self, rgb: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(rgb, 8)


def _flatten_copy(source: Path, target: Path, category: str) -> None:
    """The tiny MVTec-layout category rewritten in the toy flat layout."""
    (target / "FLAT").parent.mkdir(parents=True, exist_ok=True)
    (target / "FLAT").write_text("")
    for record in (r for split in ("train", "validation", "test") for r in MVTec3D(source).records(category, split)):
        folder = target / category / record.split
        folder.mkdir(parents=True, exist_ok=True)
        base = folder / f"{record.defect_type}__{record.stem}"
        shutil.copy(record.rgb_path, base.with_suffix(".png"))
        shutil.copy(record.xyz_path, base.with_suffix(".tiff"))
        if record.gt_path is not None:
            shutil.copy(record.gt_path, base.with_name(base.name + ".mask.png"))


def test_a_new_method_format_and_extractor_plug_in_by_registration(
    plugins: None, tiny_dataset: Path, tmp_path: Path
) -> None:
    data = tmp_path / "flat"
    _flatten_copy(tiny_dataset, data, "puck")
    assert type(open_dataset(data)) is FlatPairs  # detected from the root
    image, _ = build_extractors("coarse_rgb+fpfh")  # any pair of registered extractors
    assert isinstance(image, _CoarseRgb)

    cache = str(tmp_path / "cache")
    hparams = {"image_size": 64, "extractors": "coarse_rgb+fpfh"}
    files, errors = train_run("distance_to_mean", data, tmp_path / "run", hparams=hparams, cache_dir=cache)
    assert errors == [] and set(files) == {"puck"}
    trained = load_trained(files["puck"], cache_dir=cache)
    assert isinstance(trained.model, DistanceToMean) and trained.thresholds is not None
    assert mmiad.DistanceToMean is DistanceToMean  # the public API finds registered methods by class name

    result, errors = evaluate_run(tmp_path / "run", data, cache_dir=cache)
    tests = open_dataset(data).records("puck", "test")
    assert errors == [] and set(result["per_category"]) == {"puck"}
    # The image AUROC is the toy method's, recomputed here from its own scores.
    scores = [p.pred_score for p in trained.model.predict(tests)]
    labels = np.array([r.label for r in tests])
    wins = sum((s_bad > s_good) + 0.5 * (s_bad == s_good) for s_bad in np.array(scores)[labels == 1]
               for s_good in np.array(scores)[labels == 0])  # fmt: skip
    assert result["per_category"]["puck"]["image_auroc"] == pytest.approx(wins / (labels.sum() * (1 - labels).sum()))

    predictions = mmiad.predict(tmp_path / "run", data, category="puck", cache_dir=cache)
    assert [p.record.stem for p in predictions] == [r.stem for r in tests]
    assert {p.model for p in predictions} == {"puck"} and all(p.pred_label in (0, 1) for p in predictions)


def _pairs(tiny_dataset: Path, target: Path) -> Path:
    """puck's test split as a plain folder of ``NAME.png`` + ``NAME.tiff`` pairs (what ``predict`` reads)."""
    target.mkdir(parents=True)
    for record in MVTec3D(tiny_dataset).records("puck", "test"):
        shutil.copy(record.rgb_path, target / f"{record.defect_type}_{record.stem}.png")
        shutil.copy(record.xyz_path, target / f"{record.defect_type}_{record.stem}.tiff")
    return target


def test_a_toy_trained_method_goes_through_every_command(
    plugins: None, tiny_dataset: Path, tmp_path: Path, capsys
) -> None:
    """Registered in one line, the toy method is trained, tested, predicted and reported through the ordinary CLI,
    and ``export`` refuses it clearly (it declares no ONNX scorer)."""
    from mmiad.cli.main import main

    cache, run = ["--cache-dir", str(tmp_path / "cache")], str(tmp_path / "run")
    options = ["--extractors", "coarse_rgb+fpfh", "--image-size", "64"]
    train = ["train", "--method", "distance_to_mean", "--data", str(tiny_dataset), "--categories", "puck"]
    assert main([*train, "--out", run, *options, *cache]) == 0
    metrics = tmp_path / "metrics.json"
    assert main(["test", "--run", run, "--data", str(tiny_dataset), "--json", str(metrics), *cache]) == 0
    assert set(json.loads(metrics.read_text())["per_category"]) == {"puck"}
    inputs, out = _pairs(tiny_dataset, tmp_path / "inputs"), tmp_path / "pred"
    assert main(["predict", "--run", run, "--input", str(inputs), "--out", str(out), *cache]) == 0
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert sorted(r["name"] for r in rows) == sorted(p.stem for p in inputs.glob("*.png"))
    assert all(Path(r["rgb_path"]).parent == inputs for r in rows)  # the user's files
    report = tmp_path / "report"
    assert main(["report", "--run", run, "--data", str(tiny_dataset), "--out", str(report), *cache]) == 0
    assert (report / "index.html").is_file()
    capsys.readouterr()
    assert main(["export", "--run", run, "--out", str(tmp_path / "onnx"), *cache]) == 1
    assert "ONNX export is not available for method 'distance_to_mean'" in capsys.readouterr().err
    assert not (tmp_path / "onnx" / "index.json").exists()


def test_a_toy_zero_shot_method_is_scored_by_test_and_predict(
    plugins: None, tiny_dataset: Path, tmp_path: Path, capsys
) -> None:
    """A method declaring ``needs_training = False`` is scored by ``test --method`` and ``predict --method`` with no
    other change: the engine reads the capability, hands it the whole batch, and labels by the batch rule."""
    from mmiad.cli.main import main

    cache = ["--cache-dir", str(tmp_path / "cache")]
    options = ["--extractors", "coarse_rgb+fpfh", "--set", "image_size=64"]
    metrics = tmp_path / "metrics.json"
    test = ["test", "--method", "batch_outlier", "--data", str(tiny_dataset), "--categories", "puck"]
    assert main([*test, "--json", str(metrics), *options, *cache]) == 0
    result = json.loads(metrics.read_text())["per_category"]["puck"]
    # The image AUROC is the toy method's own, recomputed here from its scores over the same batch.
    records = MVTec3D(tiny_dataset).records("puck", "test")
    model = BatchOutlier(cache_dir=str(tmp_path / "cache"), extractors="coarse_rgb+fpfh", image_size=64)
    scores = np.array([p.pred_score for p in model.predict(records)])
    labels = np.array([r.label for r in records])
    wins = sum((b > g) + 0.5 * (b == g) for b in scores[labels == 1] for g in scores[labels == 0])
    assert result["image_auroc"] == pytest.approx(wins / (labels.sum() * (1 - labels).sum()))

    inputs, out = _pairs(tiny_dataset, tmp_path / "inputs"), tmp_path / "pred"
    predict = ["predict", "--method", "batch_outlier", "--input", str(inputs), "--out", str(out)]
    assert main([*predict, "--outlier-k", "0.5", *options, *cache]) == 0
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    values = np.array([float(r["score"]) for r in rows])
    median = np.median(values)
    threshold = median + 0.5 * 1.4826 * np.median(np.abs(values - median))
    assert [int(r["label"]) for r in rows] == [int(v > threshold) for v in values]
    assert main(["train", "--method", "batch_outlier", "--data", str(tiny_dataset), "--out", str(tmp_path / "r")]) == 1
    assert "needs no training" in capsys.readouterr().err
