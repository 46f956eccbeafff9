"""Dataset formats: detection, the registry, reading through a record's format, and the synthetic Eyecandies set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mmiad.data.errors import DataError
from mmiad.data.eyecandies import Eyecandies, read_depth_info, read_depth_png
from mmiad.data.folder import Folder
from mmiad.data.formats import available_formats, detect_format, get_format, load_sample, open_dataset
from mmiad.data.io import write_rgb, write_xyz
from mmiad.data.mvtec3d import MVTec3D
from mmiad.data.preprocess import preprocess_dataset
from mmiad.data.synthetic import generate_dataset, generate_sample, resolve_config
from mmiad.data.synthetic.eyecandies_layout import DEPTH_SCALE


@pytest.fixture(scope="module")
def eyecandies_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("eyecandies") / "data"
    return generate_dataset(root, preset="tiny", seed=0, categories=["puck"], layout="eyecandies")


def test_registry_lists_the_builtin_formats_most_specific_first() -> None:
    assert available_formats() == ["eyecandies", "mvtec3d", "folder"]
    assert get_format("eyecandies") is Eyecandies
    with pytest.raises(ValueError, match="unknown dataset format 'nope'; available: eyecandies, mvtec3d, folder"):
        get_format("nope")


def test_detection(tiny_dataset: Path, eyecandies_root: Path, tmp_path: Path) -> None:
    assert detect_format(tiny_dataset) is MVTec3D
    assert detect_format(eyecandies_root) is Eyecandies
    pairs = tmp_path / "pairs"
    write_rgb(pairs / "a.png", np.zeros((4, 4, 3), np.uint8))
    write_xyz(pairs / "a.tiff", np.ones((4, 4, 3), np.float32))
    assert detect_format(pairs) is Folder
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not a dataset of a known layout"):
        detect_format(tmp_path / "empty")
    with pytest.raises(DataError, match="dataset root not found"):
        open_dataset(tmp_path / "missing")
    # An explicit format is used as given, whatever the root looks like.
    assert isinstance(open_dataset(tiny_dataset, "mvtec3d"), MVTec3D)
    assert open_dataset(eyecandies_root, "mvtec3d").records("puck", "train") == []


def test_folder_format_is_predict_only(tmp_path: Path) -> None:
    pairs = tmp_path / "line7"
    for name in ("a", "b"):
        write_rgb(pairs / f"{name}.png", np.zeros((4, 4, 3), np.uint8))
        write_xyz(pairs / f"{name}.tiff", np.ones((4, 4, 3), np.float32))
    dataset = open_dataset(pairs)
    assert dataset.categories() == ["line7"] and dataset.records("line7", "train") == []
    records = dataset.records("line7", "predict")
    assert [r.stem for r in records] == ["a", "b"] and {r.format for r in records} == {"folder"}
    assert load_sample(records[0]).xyz.shape == (4, 4, 3)


def test_eyecandies_splits_map_to_the_native_folders(eyecandies_root: Path) -> None:
    config = resolve_config("tiny")
    dataset = open_dataset(eyecandies_root)
    assert dataset.categories() == ["puck"]
    train, validation, test = (dataset.records("puck", s) for s in ("train", "validation", "test"))
    assert len(train) == config.n_train and len(validation) == config.n_validation
    assert len(test) == config.n_test_good + config.n_per_defect * len(config.defects)
    assert all(r.rgb_path.parent.parent.name == "test_public" for r in test)  # evaluation on test_public
    assert [r.label for r in test] == [0] * config.n_test_good + [1] * (len(test) - config.n_test_good)
    assert {r.format for r in train + test} == {"eyecandies"}
    assert all(dict(r.extra).get("format") is None for r in train)  # the format is a field, not an extra


@pytest.mark.parametrize(("split", "folder", "index", "position"), [("train", "good", 1, 1), ("test", "bump", 0, 2)])
def test_synthetic_eyecandies_round_trip(eyecandies_root: Path, split: str, folder: str, index: int, position: int):
    """The reader recovers the synthetic object: its valid points are exactly the object's sensed pixels, and the
    stored depth is the synthetic depth in scene units to PNG quantisation."""
    generated = generate_sample(resolve_config("tiny"), 0, "puck", split, folder, index)
    record = open_dataset(eyecandies_root).records("puck", split)[position]
    sample = load_sample(record)
    sensed = generated.sample.xyz[..., 2] > 0
    on_object = generated.sample.part > 0
    np.testing.assert_array_equal(sample.valid, on_object & sensed)
    low, high = read_depth_info(dict(record.extra)["info_depth_path"])
    depth = read_depth_png(record.xyz_path, low, high)
    expected = np.where(sensed, generated.sample.xyz[..., 2] * DEPTH_SCALE, 0.0)
    step = (high - low) / 65535
    interior = np.ones(sensed.shape, bool)
    interior[0], interior[-1] = False, False  # the heuristic's anchor pixels may be filled in
    assert np.abs(depth - expected)[interior].max() <= step
    if generated.gt_mask is not None:
        np.testing.assert_array_equal(load_sample(record).gt_mask, generated.gt_mask)


def test_preprocessing_skips_formats_whose_reader_removed_the_background(eyecandies_root: Path, tmp_path: Path):
    records = open_dataset(eyecandies_root).records("puck", "train")
    prepared, errors = preprocess_dataset(records, "cfm", tmp_path / "cache")
    assert errors == [] and prepared == records and not (tmp_path / "cache").exists()
