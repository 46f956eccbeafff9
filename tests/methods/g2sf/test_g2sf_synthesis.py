"""Pseudo-anomaly synthesis: Perlin masks, the 3D paste, reproducibility, and the user's dataset left untouched."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from mmiad.methods.g2sf.perlin import keep_components, perlin_noise, random_perlin_mask
from mmiad.methods.g2sf.synthesis import Sample, cut_paste, paste_points, synthesise


def _plate(size: int = 64, seed: int = 0) -> Sample:
    rng = np.random.default_rng(seed)
    xyz = np.zeros((size, size, 3), np.float32)
    rows, cols = np.mgrid[0:size, 0:size]
    inside = (abs(rows - size / 2) < size * 0.35) & (abs(cols - size / 2) < size * 0.35)
    xyz[..., 0] = np.where(inside, cols * 1e-3, 0)
    xyz[..., 1] = np.where(inside, rows * 1e-3, 0)
    xyz[..., 2] = np.where(inside, 0.5 + 1e-4 * rng.standard_normal((size, size)), 0)
    rgb = rng.uniform(0, 255, (size, size, 3)).astype(np.float32)
    return Sample(rgb, xyz)


def test_perlin_noise_is_smooth_and_bounded() -> None:
    noise = perlin_noise((64, 64), (4, 4), np.random.default_rng(0))
    assert noise.shape == (64, 64) and np.abs(noise).max() <= np.sqrt(2) + 1e-9
    assert noise[::16, ::16] == pytest.approx(0.0, abs=1e-12)  # zero on the lattice points
    assert np.abs(np.diff(noise, axis=0)).max() < 0.25


def test_keep_components_drops_the_last_label_officially() -> None:
    mask = np.zeros((120, 120), bool)
    mask[0:12, 0:12] = True  # 144 px, label 1
    mask[50:62, 50:62] = True  # 144 px, label 2 (the last)
    mask[100:103, 100:103] = True  # 9 px: label 3 (too small) — now the last
    official = keep_components(mask)
    assert official[5, 5] and official[55, 55]  # the last label (3) is too small anyway
    mask[100:103, 100:103] = False
    assert keep_components(mask)[5, 5] and not keep_components(mask)[55, 55]
    assert keep_components(mask, keep_last=True)[55, 55]


def test_perlin_mask_stays_in_region_and_is_reproducible() -> None:
    region = np.zeros((64, 64), bool)
    region[10:54, 10:54] = True
    first = random_perlin_mask(region, np.random.default_rng(3))
    second = random_perlin_mask(region, np.random.default_rng(3))
    assert first is not None and second is not None and np.array_equal(first, second) and first.any()
    # Only the final 3×3 dilation may leave the region.
    assert not (first & ~ndimage.binary_dilation(region, np.ones((3, 3), bool))).any()


def test_paste_points_moves_relief_onto_the_base() -> None:
    base, source = _plate(seed=0), _plate(seed=1)
    source.xyz[..., 2] += 0.1  # a source standing 10 cm higher: re-centred, so it does not matter
    mask = np.zeros((64, 64), bool)
    mask[28:36, 28:36] = True
    out = paste_points(base.xyz, source.xyz, mask, mask, 1e-3)
    # x, y stay the base's; z = source relief − its centroid + base centroid + offset.
    np.testing.assert_array_equal(out[mask][:, :2], base.xyz[mask][:, :2])
    expected_z = source.xyz[mask][:, 2] - source.xyz[mask][:, 2].mean() + base.xyz[mask][:, 2].mean() + 1e-3
    np.testing.assert_allclose(out[mask][:, 2], expected_z, rtol=1e-6)
    np.testing.assert_array_equal(out[~mask], base.xyz[~mask])


def test_cut_paste_offset_range_and_mask() -> None:
    base, source = _plate(seed=0), _plate(seed=1)
    mask = np.zeros((64, 64), bool)
    mask[24:40, 24:40] = True
    sample, anomaly = cut_paste(base, source.rgb, source.xyz, mask, np.random.default_rng(0), (2e-4, 2e-3))
    assert np.array_equal(anomaly, mask)
    dz = sample.xyz[mask][:, 2] - base.xyz[mask][:, 2]
    shift = np.median(dz - (source.xyz[mask][:, 2] - source.xyz[mask][:, 2].mean()))
    assert 2e-4 - 1e-5 <= abs(shift) <= 2e-3 + 1e-5
    np.testing.assert_array_equal(sample.rgb[~mask], base.rgb[~mask])


@pytest.mark.parametrize("fmt", ["mvtec3d", "eyecandies"])
def test_synthesise_is_reproducible_under_a_seed(fmt: str) -> None:
    base, source = _plate(seed=0), _plate(seed=1)
    runs = [synthesise(base, source, source.xyz, np.random.default_rng(5), fmt=fmt, category="dowel") for _ in range(2)]
    assert runs[0] is not None and runs[1] is not None
    (a, mask_a), (b, mask_b) = runs
    assert mask_a.any() and np.array_equal(mask_a, mask_b)
    np.testing.assert_array_equal(a.rgb, b.rgb)
    np.testing.assert_array_equal(a.xyz, b.xyz)
    other = synthesise(base, source, source.xyz, np.random.default_rng(6), fmt=fmt, category="dowel")
    assert other is not None and not np.array_equal(other[1], mask_a)


def tree_digest(root: Path) -> str:
    """SHA-256 over every file's relative path, bytes and mtime under ``root``."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
        digest.update(str(path.stat().st_mtime_ns).encode())
    return digest.hexdigest()


def test_anomaly_sources_official_counts_per_format() -> None:
    from mmiad.data.sample import SampleRecord
    from mmiad.methods.g2sf.pseudo import pick_sources

    def records(category: str, fmt: str) -> list[SampleRecord]:
        return [SampleRecord(Path(f"{i}.png"), Path(f"{i}.tiff"), category, "train", format=fmt) for i in range(30)]

    mvtec = pick_sources({"a": records("a", "mvtec3d"), "b": records("b", "mvtec3d")}, None, 0)
    assert len(mvtec) == 16 and {r.category for r in mvtec} == {"a", "b"}
    assert len(pick_sources({"c": records("c", "eyecandies")}, None, 0)) == 24
    assert len(pick_sources({"c": records("c", "eyecandies")}, 3, 0)) == 3
    assert pick_sources({"a": records("a", "mvtec3d")}, None, 0) == pick_sources(
        {"a": records("a", "mvtec3d")}, None, 0
    )


def test_moved_component_loses_its_last_row_and_column_officially() -> None:
    from mmiad.methods.g2sf.synthesis import shifted_masks

    component = np.zeros((40, 40), bool)
    component[2:7, 3:9] = True  # 5×6 block, off the foreground
    foreground = np.zeros((40, 40), bool)
    foreground[20:35, 20:35] = True
    official = shifted_masks(component, foreground, np.random.default_rng(0), full_bbox=False)
    whole = shifted_masks(component, foreground, np.random.default_rng(0), full_bbox=True)
    assert official is not None and whole is not None
    target, source = official
    assert source.sum() == 4 * 5 and target.sum() == 4 * 5  # bounding box [top, bottom) × [left, right)
    assert not source[6].any() and not source[:, 8].any()
    assert np.array_equal(whole[1], component) and whole[0].sum() == 30
    rows, cols = np.nonzero(whole[0])
    assert foreground[int(np.rint(rows.mean())), int(np.rint(cols.mean()))]  # moved onto the foreground
