"""Tests for the native Eyecandies reader on tiny hand-built samples with hand-computed geometry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmiad.data.errors import DataError
from mmiad.data.eyecandies import (
    FOCAL_LENGTH,
    background_mask,
    backproject,
    list_eyecandies_categories,
    list_eyecandies_records,
    looks_like_eyecandies,
    parse_simple_yaml,
    read_depth_info,
    read_depth_png,
    read_eyecandies_xyz,
    read_pose,
)
from mmiad.data.formats import load_sample
from mmiad.data.sample import LABEL_ANOMALOUS, LABEL_NORMAL, LABEL_UNKNOWN

SIZE = 64
# Depth bounds chosen so that one PNG step is exactly 1e-5 m: depth = 0.9 + value * 1e-5.
DEPTH_MIN, DEPTH_MAX = 0.9, 0.9 + 65535 * 1e-5
PLANE_VALUE, BOX_VALUE = 30000, 20000  # 1.2 m and 1.1 m
BOX_ROWS, BOX_COLS = slice(20, 44), slice(24, 40)
INFO_YAML = f"normalization:\n  max: {DEPTH_MAX!r}\n  min: {DEPTH_MIN!r}\n"


def _scene() -> np.ndarray:
    depth = np.full((SIZE, SIZE), PLANE_VALUE, dtype=np.uint16)
    depth[BOX_ROWS, BOX_COLS] = BOX_VALUE
    return depth


def _box_mask() -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    mask[BOX_ROWS, BOX_COLS] = True
    return mask


def _write_sample(data_dir: Path, index: str, *, mask: np.ndarray | None = None, pose: np.ndarray | None = None):
    data_dir.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_scene()).save(data_dir / f"{index}_depth.png")
    (data_dir / f"{index}_info_depth.yaml").write_text(INFO_YAML)
    np.savetxt(data_dir / f"{index}_pose.txt", np.eye(4) if pose is None else pose)
    rgb = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    rgb[..., 0] = np.arange(SIZE, dtype=np.uint8)[None, :]
    Image.fromarray(rgb).save(data_dir / f"{index}_image_4.png")
    Image.fromarray(rgb[..., ::-1].copy()).save(data_dir / f"{index}_image_0.png")  # a distractor item
    if mask is not None:
        Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(data_dir / f"{index}_mask.png")


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    root = tmp_path / "eyecandies"
    category = root / "CandyCane"
    for index in ("000", "001", "002"):
        _write_sample(category / "train" / "data", index, mask=np.zeros((SIZE, SIZE), dtype=bool))
    _write_sample(category / "val" / "data", "00", mask=np.zeros((SIZE, SIZE), dtype=bool))
    _write_sample(category / "test_public" / "data", "00", mask=np.zeros((SIZE, SIZE), dtype=bool))
    _write_sample(category / "test_public" / "data", "01", mask=_box_mask())
    _write_sample(category / "test_private" / "data", "00")
    (root / "notes").mkdir()  # not a category
    return root


def _expected_box_xyz(row: int, col: int, depth: float = 1.1) -> np.ndarray:
    """Identity pose: world = camera; then axes [0,2,1] scaled by [0.1,-0.1,0.1]."""
    x = depth * (col - SIZE / 2) / FOCAL_LENGTH
    y = depth * (row - SIZE / 2) / FOCAL_LENGTH
    return np.array([0.1 * x, -0.1 * depth, 0.1 * y])


# ---------------------------------------------------------------------------------------------------- readers


def test_depth_png_is_denormalised_with_info_bounds(tmp_path: Path) -> None:
    Image.fromarray(np.array([[0, 65535], [30000, 20000]], dtype=np.uint16)).save(tmp_path / "d.png")
    depth = read_depth_png(tmp_path / "d.png", DEPTH_MIN, DEPTH_MAX)
    np.testing.assert_allclose(depth, [[0.9, DEPTH_MAX], [1.2, 1.1]], atol=1e-12)


def test_depth_png_must_be_16_bit(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(tmp_path / "d8.png")
    with pytest.raises(DataError, match="16-bit") as info:
        read_depth_png(tmp_path / "d8.png", 0.0, 1.0)
    assert info.value.path == tmp_path / "d8.png"


def test_yaml_nested_flow_and_comments(tmp_path: Path) -> None:
    path = tmp_path / "a.yaml"
    path.write_text("# header\n---\nnormalization:\n  max: 2.5  # metres\n  min: '0.5'\nother: {a: 1, b: x}\nk: v\n")
    assert parse_simple_yaml(path) == {
        "normalization.max": "2.5",
        "normalization.min": "0.5",
        "other.a": "1",
        "other.b": "x",
        "k": "v",
    }
    assert read_depth_info(path) == (0.5, 2.5)


@pytest.mark.parametrize(
    "text, problem",
    [
        ("normalization:\n  min 0.9\n  max: 1.0\n", "line 2"),  # no colon
        ("normalization:\n  min: 0.9\n    max: 1.0\n", "line 3"),  # deeper than a value line
        ("normalization:\n  - 0.9\n", "line 2"),  # a list
        ("normalization:\n  min: 0.9\n", "normalization.max"),  # missing key
        ("normalization:\n  min: 0.9\n  max: far\n", "not a number"),
        ("normalization:\n  min: 2.0\n  max: 1.0\n", "invalid depth bounds"),
    ],
)
def test_malformed_info_yaml_names_the_file(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "007_info_depth.yaml"
    path.write_text(text)
    with pytest.raises(DataError, match=problem) as info:
        read_depth_info(path)
    assert info.value.path == path
    assert "007_info_depth.yaml" in str(info.value)


def test_pose_must_be_rigid_4x4(tmp_path: Path) -> None:
    np.savetxt(tmp_path / "p3.txt", np.eye(4)[:3])
    with pytest.raises(DataError, match="4×4"):
        read_pose(tmp_path / "p3.txt")
    bad = np.eye(4)
    bad[3, 0] = 0.5
    np.savetxt(tmp_path / "p.txt", bad)
    with pytest.raises(DataError, match=r"\[0 0 0 1\]"):
        read_pose(tmp_path / "p.txt")


# ---------------------------------------------------------------------------------------------------- geometry

ROT_Z90 = np.array([[0.0, -1.0, 0.0, 1.0], [1.0, 0.0, 0.0, 2.0], [0.0, 0.0, 1.0, 3.0], [0.0, 0.0, 0.0, 1.0]])


def test_backproject_applies_inverse_pose_like_the_official_converters() -> None:
    depth = np.full((4, 4), 2.0)
    points = backproject(depth, ROT_Z90, focal_length=2.0)
    # Centre pixel (2, 2): camera (0, 0, 2); world = R^T (c - t) = R^T (-1, -2, -1) = (-2, 1, -1).
    np.testing.assert_allclose(points[2, 2], [-2.0, 1.0, -1.0], atol=1e-12)
    # Corner (0, 0): camera (2*(0-2)/2, 2*(0-2)/2, 2) = (-2, -2, 2); c - t = (-3, -4, -1); R^T -> (-4, 3, -1).
    np.testing.assert_allclose(points[0, 0], [-4.0, 3.0, -1.0], atol=1e-12)


def test_backproject_direct_pose_matches_the_eyecandies_stage() -> None:
    points = backproject(np.full((4, 4), 2.0), ROT_Z90, focal_length=2.0, invert_pose=False)
    # Centre pixel: R (0, 0, 2) + t = (1, 2, 5).
    np.testing.assert_allclose(points[2, 2], [1.0, 2.0, 5.0], atol=1e-12)


def test_background_mask_on_a_tilted_plane() -> None:
    bottom = np.array([0.0, 1.0, 2.0])
    along = np.array([0.0, 0.6, 0.8])  # unit direction from the bottom- to the top-centre anchor
    up = np.array([0.0, -0.8, 0.6])  # unit normal pointing away from the surface (negative rotated y)

    def point(a: float, h: float, x: float = 0.0) -> np.ndarray:
        return bottom + a * along + h * up + np.array([x, 0.0, 0.0])

    points = np.stack(
        [
            [point(0.5, 0.1), point(1.0, 0.0), point(0.5, 0.01)],  # object, top anchor, too low (1 cm)
            [point(1.9, 0.1), point(0.5, 0.1, x=1.5), point(0.5, 0.1, x=-0.9)],  # too far, |x|>1, object
            [point(0.5, -0.1), point(0.0, 0.0), point(0.5, 0.03)],  # below the surface, bottom anchor, object
        ]
    )
    expected = np.array([[False, True, True], [True, True, False], [True, True, False]])
    np.testing.assert_array_equal(background_mask(points), expected)


def test_background_mask_needs_distinct_anchors() -> None:
    with pytest.raises(ValueError, match="coincide"):
        background_mask(np.zeros((3, 3, 3)))


# ---------------------------------------------------------------------------------------------------- records


def test_listing_maps_splits_and_labels(dataset: Path) -> None:
    assert looks_like_eyecandies(dataset)
    assert list_eyecandies_categories(dataset) == ["CandyCane"]
    train = list_eyecandies_records(dataset, "CandyCane", "train")
    assert [r.rgb_path.name for r in train] == ["000_image_4.png", "001_image_4.png", "002_image_4.png"]
    assert [r.stem for r in train] == ["000", "001", "002"]  # names in maps folders and reports
    assert train[1].sample_id == "CandyCane/train/good/001"
    assert {(r.split, r.defect_type, r.label, r.gt_path) for r in train} == {("train", "good", LABEL_NORMAL, None)}
    (val,) = list_eyecandies_records(dataset, "CandyCane", "validation")
    assert (val.split, val.label, val.rgb_path.parent.parent.name) == ("validation", LABEL_NORMAL, "val")
    good, bad = list_eyecandies_records(dataset, "CandyCane", "test")
    assert (good.defect_type, good.label, good.gt_path) == ("good", LABEL_NORMAL, None)
    assert (bad.defect_type, bad.label) == ("bad", LABEL_ANOMALOUS)
    assert bad.gt_path == dataset / "CandyCane" / "test_public" / "data" / "01_mask.png"
    extra = bad.extra_dict()
    assert bad.format == "eyecandies" and "format" not in extra
    assert bad.xyz_path.name == "01_depth.png" and Path(extra["pose_path"]).name == "01_pose.txt"
    assert Path(extra["info_depth_path"]).name == "01_info_depth.yaml"
    (private,) = list_eyecandies_records(dataset, "CandyCane", "predict")
    assert (private.label, private.defect_type, private.gt_path) == (LABEL_UNKNOWN, "unknown", None)


def test_looks_like_eyecandies_rejects_other_layouts(tmp_path: Path) -> None:
    (tmp_path / "mvtec" / "bagel" / "train" / "good" / "rgb").mkdir(parents=True)
    assert not looks_like_eyecandies(tmp_path / "mvtec")
    assert not looks_like_eyecandies(tmp_path / "missing")


def test_incomplete_samples_are_reported(dataset: Path) -> None:
    data_dir = dataset / "CandyCane" / "train" / "data"
    (data_dir / "001_pose.txt").unlink()
    errors: list[DataError] = []
    records = list_eyecandies_records(dataset, "CandyCane", "train", errors=errors)
    assert [r.rgb_path.name[:3] for r in records] == ["000", "002"]
    assert len(errors) == 1 and errors[0].path == data_dir / "001_pose.txt"
    with pytest.raises(DataError, match=r"001_pose\.txt"):
        list_eyecandies_records(dataset, "CandyCane", "train")
    (dataset / "CandyCane" / "test_public" / "data" / "01_mask.png").unlink()
    with pytest.raises(DataError, match=r"01_mask\.png"):
        list_eyecandies_records(dataset, "CandyCane", "test")


def test_unknown_split_and_category(dataset: Path) -> None:
    with pytest.raises(DataError, match="unknown split"):
        list_eyecandies_records(dataset, "CandyCane", "test_public")
    with pytest.raises(DataError, match="not found"):
        list_eyecandies_records(dataset, "Lollipop", "train")


def test_xyz_back_projection_axes_and_background(dataset: Path) -> None:
    _, bad = list_eyecandies_records(dataset, "CandyCane", "test")
    xyz = read_eyecandies_xyz(bad)
    assert xyz.shape == (SIZE, SIZE, 3) and xyz.dtype == np.float32
    # Centre pixel on the box at 1.1 m: x = y = 0 before the reorder; z = 1.1 becomes the second axis, negated.
    np.testing.assert_allclose(xyz[32, 32], [0.0, -0.11, 0.0], atol=1e-7)
    for row, col in [(20, 24), (43, 39), (25, 33)]:
        np.testing.assert_allclose(xyz[row, col], _expected_box_xyz(row, col), atol=1e-7)
    # The plane (20 cm behind the box, within 2 cm of the anchors' line) is background: exactly zero.
    foreground = np.any(xyz != 0, axis=-1)
    np.testing.assert_array_equal(foreground, _box_mask())
    assert np.all(xyz[~_box_mask()] == 0.0)


def test_background_removal_can_be_disabled(dataset: Path) -> None:
    (record,) = list_eyecandies_records(dataset, "CandyCane", "validation", remove_background=False)
    xyz = read_eyecandies_xyz(record)
    np.testing.assert_allclose(xyz[0, 0], _expected_box_xyz(0, 0, depth=1.2), atol=1e-7)
    np.testing.assert_allclose(xyz[32, 32], [0.0, -0.11, 0.0], atol=1e-7)


def test_rotated_pose_changes_the_world_frame(dataset: Path) -> None:
    data_dir = dataset / "CandyCane" / "val" / "data"
    np.savetxt(data_dir / "00_pose.txt", ROT_Z90)
    (record,) = list_eyecandies_records(dataset, "CandyCane", "validation", remove_background=False)
    xyz = read_eyecandies_xyz(record)
    # Centre pixel at 1.1 m: world = R^T((0, 0, 1.1) - (1, 2, 3)) = (-2, 1, -1.9) -> [0,2,1]*[.1,-.1,.1].
    np.testing.assert_allclose(xyz[32, 32], [-0.2, 0.19, 0.1], atol=1e-6)


def test_load_sample_end_to_end(dataset: Path) -> None:
    good, bad = list_eyecandies_records(dataset, "CandyCane", "test")
    sample = load_sample(bad)
    assert sample.label == LABEL_ANOMALOUS and sample.defect_type == "bad"
    np.testing.assert_array_equal(sample.gt_mask, _box_mask())
    np.testing.assert_array_equal(sample.valid, _box_mask())
    assert sample.rgb.shape == (SIZE, SIZE, 3) and sample.rgb[0, 5, 0] == 5  # image_4, not the image_0 distractor
    np.testing.assert_allclose(sample.xyz[32, 32], [0.0, -0.11, 0.0], atol=1e-7)
    good_sample = load_sample(good)
    assert good_sample.label == LABEL_NORMAL and not good_sample.gt_mask.any()


def test_missing_extra_and_malformed_yaml_surface_as_data_errors(dataset: Path) -> None:
    (record,) = list_eyecandies_records(dataset, "CandyCane", "validation")
    info_path = Path(record.extra_dict()["info_depth_path"])
    info_path.write_text("normalization\n  min: 0.9\n")
    with pytest.raises(DataError, match="malformed YAML") as info:
        load_sample(record)
    assert info.value.path == info_path
    stripped = type(record)(**{**record.__dict__, "extra": (("format", "eyecandies"),)})
    with pytest.raises(DataError, match="info_depth_path"):
        read_eyecandies_xyz(stripped)
