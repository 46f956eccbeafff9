"""A new method, a new dataset format and a new extractor plug in by registration alone.

Each is defined here, registered with its registry's one call, and then used through the ordinary engine entry
points (train, test, predict, the Python API) with no other change anywhere: the proof that adding one touches only
its own module plus one registration line.
"""

from __future__ import annotations

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
    register_format("flatpairs")(FlatPairs)
    register_image_extractor(
        "coarse_rgb", lambda **_: _CoarseRgb(), "mean colour per 8×8 patch (toy)", needs_weights=False
    )
    try:
        yield
    finally:
        method_registry._REGISTRY.pop("distance_to_mean", None)
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
