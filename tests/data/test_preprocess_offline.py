"""Profiles, per-sample cleaning and the on-disk cache of preprocessed copies."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from mmiad.data.errors import DataError
from mmiad.data.formats import load_sample
from mmiad.data.io import read_rgb, read_xyz, write_mask, write_rgb, write_xyz
from mmiad.data.mvtec3d import list_records
from mmiad.data.preprocess import (
    PROFILES,
    default_cache_root,
    get_profile,
    preprocess_dataset,
    preprocess_sample,
    profile_cache_dir,
)
from mmiad.data.sample import Sample


def _scene(seed: int, height: int = 40, width: int = 50) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RGB, xyz and object mask: a tilted support plane (1 mm pixels), a box 2 cm above it and one stray point."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float64)
    x, y = (cols - width / 2) * 0.001, (rows - height / 2) * 0.001
    z = 0.5 + 0.1 * x + 0.05 * y
    obj = (rows >= 12) & (rows < 28) & (cols >= 15 + seed) & (cols < 35)
    z = np.where(obj, z - 0.02, z)
    z[5, 45] -= 0.1  # a lone point far above the plane: kept by plane removal, dropped by clustering
    xyz = np.stack([x, y, z], axis=-1).astype(np.float32)
    xyz[2, 2] = 0.0  # an invalid pixel in the raw scan
    rgb = rng.integers(1, 256, (height, width, 3), dtype=np.uint8)
    return rgb, xyz, obj


def _sample(seed: int = 0) -> Sample:
    rgb, xyz, _ = _scene(seed)
    return Sample(rgb, xyz, np.any(xyz != 0, axis=-1), None, 0, "widget", "good")


def _write_dataset(root: Path) -> Path:
    """A tiny MVTec 3D-AD layout: widget/train/good (2 samples) and widget/test/crack (1 sample with GT)."""
    for split, defect, stems in [("train", "good", ["000", "001"]), ("test", "crack", ["000"])]:
        for i, stem in enumerate(stems):
            rgb, xyz, obj = _scene(i + (2 if split == "test" else 0))
            folder = root / "widget" / split / defect
            write_rgb(folder / "rgb" / f"{stem}.png", rgb)
            write_xyz(folder / "xyz" / f"{stem}.tiff", xyz)
            if defect != "good":
                write_mask(folder / "gt" / f"{stem}.png", obj)
    return root


def _records(root: Path) -> list:
    return list_records(root, "widget", "train") + list_records(root, "widget", "test")


def _digests(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_profiles_and_fingerprints() -> None:
    assert set(PROFILES) == {"cfm", "m3dm", "none"}
    cfm = get_profile("cfm")
    assert (cfm.plane_distance_threshold, cfm.plane_removal_threshold, cfm.cluster_eps) == (0.004, 0.005, 0.006)
    assert not cfm.zero_rgb_background and get_profile("m3dm").zero_rgb_background
    assert cfm.fingerprint() == dataclasses.replace(cfm).fingerprint()
    fingerprints = {cfm.fingerprint()}
    for change in [{"cluster_eps": 0.007}, {"seed": 1}, {"rgb_pad_mode": "constant"}, {"border": 11}]:
        fingerprints.add(dataclasses.replace(cfm, **change).fingerprint())
    assert len(fingerprints) == 5
    with pytest.raises(ValueError, match="cfm, m3dm, none"):
        get_profile("m3dn")
    with pytest.raises(ValueError, match="rgb_pad_mode"):
        dataclasses.replace(cfm, rgb_pad_mode="reflect")


def test_preprocess_sample_cleans_xyz_and_zeroes_rgb_only_for_m3dm() -> None:
    sample = _sample()
    rgb_before, xyz_before = sample.rgb.copy(), sample.xyz.copy()
    _, _, obj = _scene(0)
    cfm = preprocess_sample(sample, "cfm")
    np.testing.assert_array_equal(cfm.valid, obj)
    assert (cfm.xyz[~obj] == 0).all()
    np.testing.assert_array_equal(cfm.xyz[obj], sample.xyz[obj])
    np.testing.assert_array_equal(cfm.rgb, sample.rgb)
    m3dm = preprocess_sample(sample, "m3dm")
    removed = sample.valid & ~obj
    assert (m3dm.rgb[removed] == 0).all()
    np.testing.assert_array_equal(m3dm.rgb[obj], sample.rgb[obj])
    np.testing.assert_array_equal(m3dm.rgb[2, 2], sample.rgb[2, 2])  # invalid in the raw scan: not "removed"
    none = preprocess_sample(sample, "none")
    np.testing.assert_array_equal(none.valid, sample.valid)
    np.testing.assert_array_equal(sample.rgb, rgb_before)
    np.testing.assert_array_equal(sample.xyz, xyz_before)


def test_preprocess_sample_with_nothing_left_names_the_file(tmp_path: Path) -> None:
    root = _write_dataset(tmp_path / "data")
    record = _records(root)[0]
    sample = load_sample(record)
    plane_only = sample.xyz.copy()
    plane_only[..., 2] = np.where(sample.valid, 0.5 + 0.1 * plane_only[..., 0] + 0.05 * plane_only[..., 1], 0)
    flat = dataclasses.replace(sample, xyz=plane_only)  # every point lies on the support: all are removed
    with pytest.raises(DataError, match="no valid point left") as info:
        preprocess_sample(flat, "cfm")
    assert info.value.path == record.xyz_path


def test_preprocess_dataset_writes_copies_and_leaves_the_input_untouched(tmp_path: Path) -> None:
    root = _write_dataset(tmp_path / "data")
    before = _digests(root)
    records = _records(root)
    cache = tmp_path / "cache"
    out, errors = preprocess_dataset(records, "m3dm", cache)
    assert errors == []
    assert _digests(root) == before
    assert [(r.category, r.split, r.defect_type, r.label, r.stem) for r in out] == [
        (r.category, r.split, r.defect_type, r.label, r.stem) for r in records
    ]
    base = profile_cache_dir(cache, "m3dm")
    for original, cached in zip(records, out, strict=True):
        assert cached.xyz_path.is_relative_to(base) and cached.rgb_path.is_relative_to(base)
        assert cached.xyz_path.parts[-5:] == (
            "widget",
            original.split,
            original.defect_type,
            "xyz",
            f"{original.stem}.tiff",
        )
        assert cached.gt_path == original.gt_path
        expected = preprocess_sample(load_sample(original), "m3dm")
        np.testing.assert_array_equal(read_xyz(cached.xyz_path), expected.xyz)
        np.testing.assert_array_equal(read_rgb(cached.rgb_path), expected.rgb)
    assert not [p for p in cache.rglob("*") if ".tmp" in p.name]
    cfm_out, _ = preprocess_dataset(records, "cfm", cache)
    assert [r.rgb_path for r in cfm_out] == [r.rgb_path for r in records]  # CFM keeps the original RGB
    assert not list(profile_cache_dir(cache, "cfm").rglob("*.png"))
    assert preprocess_dataset(records, "none", cache) == (records, [])


def test_cache_is_reused_and_invalidated_when_the_source_changes(tmp_path: Path) -> None:
    root = _write_dataset(tmp_path / "data")
    records = _records(root)
    out, _ = preprocess_dataset(records, "cfm", tmp_path / "cache")
    mtimes = [r.xyz_path.stat().st_mtime_ns for r in out]
    out_again, _ = preprocess_dataset(records, "cfm", tmp_path / "cache")
    assert out_again == out
    assert [r.xyz_path.stat().st_mtime_ns for r in out] == mtimes
    # Change one source: shift the box by 3 pixels, and make sure the mtime moves too.
    _, xyz, obj = _scene(3)
    write_xyz(records[0].xyz_path, xyz)
    stat = records[0].xyz_path.stat()
    os.utime(records[0].xyz_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    preprocess_dataset(records, "cfm", tmp_path / "cache")
    assert out[0].xyz_path.stat().st_mtime_ns != mtimes[0]
    assert [r.xyz_path.stat().st_mtime_ns for r in out[1:]] == mtimes[1:]
    np.testing.assert_array_equal(np.any(read_xyz(out[0].xyz_path) != 0, axis=-1), obj)


def test_bad_sample_is_reported_and_skipped(tmp_path: Path) -> None:
    root = _write_dataset(tmp_path / "data")
    records = _records(root)
    records[1].xyz_path.write_bytes(b"not a tiff")
    out, errors = preprocess_dataset(records, "cfm", tmp_path / "cache")
    assert len(errors) == 1 and errors[0].path == records[1].xyz_path
    assert [r.sample_id for r in out] == [records[0].sample_id, records[2].sample_id]
    assert all(r.xyz_path.is_file() for r in out)


def test_two_datasets_with_the_same_categories_do_not_collide(tmp_path: Path) -> None:
    first = _records(_write_dataset(tmp_path / "a" / "data"))
    second_root = _write_dataset(tmp_path / "b" / "data")
    _, xyz, _ = _scene(5)
    write_xyz(second_root / "widget" / "train" / "good" / "xyz" / "000.tiff", xyz)
    out_a, _ = preprocess_dataset(first, "cfm", tmp_path / "cache")
    out_b, _ = preprocess_dataset(_records(second_root), "cfm", tmp_path / "cache")
    assert out_a[0].xyz_path != out_b[0].xyz_path
    assert not np.array_equal(read_xyz(out_a[0].xyz_path), read_xyz(out_b[0].xyz_path))


def test_default_cache_root_honours_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MMIAD_CACHE", str(tmp_path / "c"))
    assert default_cache_root() == tmp_path / "c"
    monkeypatch.delenv("MMIAD_CACHE")
    assert default_cache_root() == Path.home() / ".cache" / "mmiad"
