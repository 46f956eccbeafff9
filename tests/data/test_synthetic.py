"""Tests of the synthetic dataset generator: layout, physics of the point clouds, defects and determinism."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from mmiad.data.formats import load_sample
from mmiad.data.io import read_rgb, read_xyz, valid_points
from mmiad.data.mvtec3d import list_categories, list_records
from mmiad.data.synthetic import (
    CATEGORIES,
    DEFECT_KINDS,
    DEFECT_TYPES,
    PRESETS,
    generate_dataset,
    generate_sample,
    resolve_config,
)
from mmiad.data.synthetic.shapes import SHAPES

TINY = PRESETS["tiny"]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("tiny"), "tiny", seed=0)


def _plane_heights(xyz: np.ndarray, strip: int = 10) -> np.ndarray:
    """Signed height (m) of every point above a least-squares plane through the valid border-strip points."""
    border = np.zeros(xyz.shape[:2], dtype=bool)
    border[:strip] = border[-strip:] = True
    border[:, :strip] = border[:, -strip:] = True
    points = xyz[border & valid_points(xyz)].astype(np.float64)
    centre = points.mean(axis=0)
    normal = np.linalg.svd(points - centre, full_matrices=False)[2][2]
    if normal[2] > 0:  # point it towards the camera (z is depth), so heights above the plane are positive
        normal = -normal
    return (xyz.astype(np.float64) - centre) @ normal


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_counts_and_masks(tiny_root: Path) -> None:
    assert list_categories(tiny_root) == sorted(TINY.categories)
    for category in TINY.categories:
        train = list_records(tiny_root, category, "train")
        validation = list_records(tiny_root, category, "validation")
        test = list_records(tiny_root, category, "test")
        assert [r.stem for r in train] == [f"{i:03d}" for i in range(TINY.n_train)]
        assert len(validation) == TINY.n_validation
        assert {r.defect_type for r in train + validation} == {"good"}
        per_folder: dict[str, int] = {}
        for record in test:
            per_folder[record.defect_type] = per_folder.get(record.defect_type, 0) + 1
        assert per_folder == {"good": TINY.n_test_good, **dict.fromkeys(TINY.defects, TINY.n_per_defect)}
        assert not (tiny_root / category / "test" / "good" / "gt").exists()
        for record in train + validation + test:
            sample = load_sample(record)
            assert sample.rgb.shape == (*TINY.image_size, 3)
            assert sample.gt_mask is not None
            if record.defect_type == "good":
                assert sample.label == 0 and not sample.gt_mask.any()
            else:
                assert sample.label == 1 and sample.gt_mask.any()
                with Image.open(record.gt_path) as image:
                    assert set(np.unique(np.asarray(image))) == {0, 255}


def test_point_clouds_are_metric_with_object_above_flat_plane(tiny_root: Path) -> None:
    for category in TINY.categories:
        for record in list_records(tiny_root, category, "train") + list_records(tiny_root, category, "test"):
            assert tifffile.imread(record.xyz_path).dtype == np.float32
            xyz = read_xyz(record.xyz_path)
            valid = valid_points(xyz)
            missing = 1.0 - valid.mean()
            assert 0.005 < missing < 0.25  # dropout, a border band and steep edges, but mostly measured
            z = xyz[..., 2][valid]
            assert z.min() > 0.3 and z.max() < 0.5
            height = _plane_heights(xyz)[valid]
            raised = height > 0.005  # what the official preprocessing keeps
            assert 0.03 < raised.mean() < 0.6
            assert np.median(height[raised]) >= 0.01


def test_plane_and_object_by_construction() -> None:
    # The generator knows which pixel sees the object: background points lie on the plane, object points stand up.
    config = resolve_config("tiny", categories=CATEGORIES)
    for category in CATEGORIES:
        for index in range(2):
            frame = generate_sample(config, 3, category, "train", "good", index).sample
            valid = valid_points(frame.xyz)
            height = _plane_heights(frame.xyz)
            background = valid & (frame.part == 0)
            on_object = valid & (frame.part > 0)
            assert np.abs(height[background]).max() < 0.002
            assert np.median(height[on_object]) >= 0.01
            assert height[on_object].max() < 0.04
            # Camera coordinates: x grows to the right, y downwards.
            xs, ys = frame.xyz[..., 0], frame.xyz[..., 1]
            assert xs[valid & (np.arange(64)[None, :] > 40)].min() > 0 > xs[valid & (np.arange(64)[None, :] < 20)].max()
            assert ys[valid & (np.arange(64)[:, None] > 40)].min() > 0 > ys[valid & (np.arange(64)[:, None] < 20)].max()


def test_same_seed_same_bytes_other_seed_other_data(tiny_root: Path, tmp_path: Path) -> None:
    again = generate_dataset(tmp_path / "again", "tiny", seed=0)
    assert _files(again) == _files(tiny_root)
    other = generate_dataset(tmp_path / "other", "tiny", seed=1, categories=["puck"])
    reference = _files(tiny_root / "puck")
    changed = _files(other / "puck")
    assert changed.keys() == reference.keys()
    assert all(changed[name] != reference[name] for name in changed if "/gt/" not in name)


def test_changing_one_split_count_leaves_the_others(tiny_root: Path, tmp_path: Path) -> None:
    out = generate_dataset(tmp_path / "fewer", "tiny", seed=0, categories=["block"], n_train=2, n_per_defect=0)
    assert len(list_records(out, "block", "train")) == 2
    files = _files(out / "block")
    reference = _files(tiny_root / "block")
    assert files and all(files[name] == reference[name] for name in files)
    assert not any(name.startswith("train/good/rgb/002") for name in files)


def _parts_nearby(nominal_part: np.ndarray, part: np.ndarray, radius: int) -> np.ndarray:
    """H×W bool: the pixel's part occurs within ``radius`` pixels in the nominal part map (a shifted boundary)."""
    found = np.zeros(part.shape, dtype=bool)
    padded = np.pad(nominal_part, radius, constant_values=-1)
    height, width = part.shape
    for di in range(2 * radius + 1):
        for dj in range(2 * radius + 1):
            found |= padded[di : di + height, dj : dj + width] == part
    return found


def _sample(defect: str, category: str = "puck", size: int = 64, index: int = 0):
    config = resolve_config("tiny", image_size=size, categories=CATEGORIES, defects=DEFECT_TYPES)
    return generate_sample(config, 0, category, "test", defect, index)


@pytest.mark.parametrize("category", CATEGORIES)
def test_crossmodal_changes_colour_only_with_a_colour_from_another_surface(category: str) -> None:
    generated = _sample("crossmodal", category)
    mask, sample, nominal = generated.gt_mask, generated.sample, generated.nominal
    assert mask is not None and mask.any()
    # Geometry bit-for-bit nominal, everywhere.
    np.testing.assert_array_equal(sample.xyz, nominal.xyz)
    # Colour changes inside the mask only.
    diff = np.abs(sample.rgb.astype(int) - nominal.rgb.astype(int)).max(axis=-1)
    assert diff[mask].mean() > 20
    assert not diff[~mask].any()
    # The new colour is the one another kind of surface of this object has; the geometry under it is not that kind.
    shape = SHAPES[category]
    assert set(np.unique(nominal.part[mask])) <= set(shape.crossmodal_targets)
    assert set(np.unique(sample.part[mask])) == {shape.crossmodal_source}
    source_colour = nominal.albedo[nominal.part == shape.crossmodal_source].mean(axis=0)
    np.testing.assert_allclose(sample.albedo[mask].mean(axis=0), source_colour, atol=0.06)


def test_crossmodal_written_file_is_the_generated_sample(tiny_root: Path) -> None:
    generated = generate_sample(TINY, 0, "block", "test", "crossmodal", 0)
    folder = tiny_root / "block" / "test" / "crossmodal"
    np.testing.assert_array_equal(read_xyz(folder / "xyz" / "000.tiff"), generated.sample.xyz)
    np.testing.assert_array_equal(read_rgb(folder / "rgb" / "000.png"), generated.sample.rgb)


def test_stain_keeps_geometry_and_changes_colour() -> None:
    generated = _sample("stain")
    mask = generated.gt_mask
    np.testing.assert_array_equal(generated.sample.xyz, generated.nominal.xyz)
    diff = np.abs(generated.sample.rgb.astype(int) - generated.nominal.rgb.astype(int)).max(axis=-1)
    assert diff[mask].mean() > 20 and not diff[~mask].any()


def test_bump_changes_geometry_inside_the_mask() -> None:
    generated = _sample("bump", "block")
    mask = generated.gt_mask
    both = mask & valid_points(generated.sample.xyz) & valid_points(generated.nominal.xyz)
    rise = generated.nominal.xyz[..., 2] - generated.sample.xyz[..., 2]  # closer to the camera = raised
    assert both.sum() >= 3
    assert rise[both].max() > 0.0015 and np.median(rise[both]) > 0.0003
    np.testing.assert_array_equal(generated.sample.albedo[~mask], generated.nominal.albedo[~mask])


@pytest.mark.parametrize("defect", DEFECT_TYPES)
def test_every_defect_is_on_the_object_and_in_its_modality(defect: str) -> None:
    for category in CATEGORIES:
        generated = _sample(defect, category, size=96, index=1)
        mask, sample, nominal = generated.gt_mask, generated.sample, generated.nominal
        assert mask is not None
        object_area = nominal.object_mask.sum()
        assert 0.002 * object_area < mask.sum() < 0.15 * object_area, (category, mask.sum(), object_area)
        assert not (mask & ~(nominal.object_mask | sample.object_mask)).any()
        geometry_same = np.array_equal(sample.xyz, nominal.xyz)
        colour_same = np.array_equal(sample.albedo, nominal.albedo)
        kind = DEFECT_KINDS[defect]
        assert geometry_same == (kind in ("colour", "crossmodal")), category
        if kind == "geometric":
            # Nothing is painted: the surface keeps its kind (and so its colour) except where the defect uncovers
            # or hides another surface (a side, the plane).
            assert generated.defect.paint is None
            relabelled = sample.part != nominal.part
            assert relabelled.sum() <= 0.3 * mask.sum(), (category, relabelled.sum(), mask.sum())
            assert _parts_nearby(nominal.part, sample.part, radius=2)[relabelled].all(), category
        else:
            assert not colour_same, category


def test_non_square_images(tmp_path: Path) -> None:
    out = generate_dataset(
        tmp_path,
        "tiny",
        image_size=(64, 96),
        categories=["ring"],
        n_train=1,
        n_validation=0,
        n_test_good=1,
        defects=["hole"],
        progress=True,
    )
    records = list_records(out, "ring", "train") + list_records(out, "ring", "test")
    assert [r.defect_type for r in records] == ["good", "good", "hole"]
    for record in records:
        sample = load_sample(record)
        assert sample.rgb.shape == (64, 96, 3) and sample.xyz.shape == (64, 96, 3)
        height = _plane_heights(sample.xyz)[sample.valid]
        assert np.median(height[height > 0.005]) >= 0.01
    assert load_sample(records[-1]).gt_mask.any()


def test_surface_types_have_distinct_colours() -> None:
    for shape in SHAPES.values():
        palette = np.asarray(shape.palette)
        source = palette[shape.crossmodal_source - 1]
        for target in shape.crossmodal_targets:
            assert np.abs(source - palette[target - 1]).max() > 0.2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"preset": "huge"}, "unknown preset"),
        ({"categories": ["teapot"]}, "teapot"),
        ({"defects": ["scratch"]}, "scratch"),
        ({"image_size": 16}, "image_size"),
        ({"n_train": -1}, "n_train"),
    ],
)
def test_bad_settings_are_rejected(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generate_dataset(tmp_path, **kwargs)


def test_existing_output_needs_overwrite(tmp_path: Path) -> None:
    generate_dataset(tmp_path, "tiny", categories=["puck"], n_train=1, n_validation=0, n_test_good=0, n_per_defect=0)
    with pytest.raises(ValueError, match="overwrite"):
        generate_dataset(tmp_path, "tiny", categories=["puck"], n_train=1)
    (tmp_path / "puck" / "train" / "good" / "rgb" / "stale.png").write_bytes(b"")
    generate_dataset(tmp_path, "tiny", categories=["puck"], n_train=1, n_validation=0, n_test_good=0, overwrite=True)
    assert not (tmp_path / "puck" / "train" / "good" / "rgb" / "stale.png").exists()
