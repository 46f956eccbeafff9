"""Hostile input files: size limits before decoding, absurd coordinates, overflow; the rest of a batch carries on."""

from __future__ import annotations

import struct
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tifffile

from mmiad.data.errors import DataError
from mmiad.data.formats import load_sample
from mmiad.data.io import MAX_PIXELS, read_mask, read_rgb, read_xyz, write_xyz
from mmiad.data.mvtec3d import list_records
from mmiad.data.preprocess import dbscan_labels, preprocess_sample
from mmiad.engine import load_trained, predict_records, run_models

from .conftest import copy_record


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int, mode: int = 2) -> bytes:
    """A tiny PNG whose header declares ``width``×``height`` pixels (8-bit, colour type ``mode``)."""
    header = struct.pack(">IIBBBBB", width, height, 8, mode, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"")) + _chunk(b"IEND", b"")


def tiff_declaring(path: Path, width: int, height: int) -> None:
    """A small float32 H×W×3 TIFF whose header is then edited to declare ``width``×``height`` points."""
    tifffile.imwrite(path, np.ones((4, 4, 3), np.float32), photometric="rgb")
    with tifffile.TiffFile(path) as tif:
        tags = tif.pages[0].tags
        offsets = {name: tags[name].valueoffset for name in ("ImageWidth", "ImageLength")}
        kinds = {name: tags[name].dtype for name in offsets}
    with path.open("r+b") as handle:
        for name, value in (("ImageWidth", width), ("ImageLength", height)):
            handle.seek(offsets[name])
            handle.write(struct.pack("<I" if kinds[name] == 4 else "<H", value))


@pytest.mark.parametrize(("width", "height"), [(30000, 30000), (12000, 9000)])
@pytest.mark.parametrize("reader", [read_rgb, read_mask])
def test_a_png_declaring_too_many_pixels_is_refused_before_decoding(reader, width, height, tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(png_declaring(width, height))
    assert path.stat().st_size < 100 and width * height > MAX_PIXELS
    with pytest.raises(DataError) as raised:
        reader(path)
    problem = raised.value.problem
    assert raised.value.path == path and ("too large" in problem or "above the limit" in problem)


def test_a_tiff_declaring_too_many_points_is_refused_before_decoding(tmp_path: Path) -> None:
    path = tmp_path / "bomb.tiff"
    tiff_declaring(path, 20000, 20000)
    with pytest.raises(DataError, match="above the limit") as raised:
        read_xyz(path)
    assert raised.value.path == path


@pytest.mark.parametrize(("shape", "dtype", "message"), [((8, 8), np.float32, "H×W×3"), ((8, 8, 3), np.int32, "dtype")])
def test_a_tiff_of_the_wrong_form_is_refused_from_its_header(shape, dtype, message, tmp_path: Path) -> None:
    path = tmp_path / "odd.tiff"
    tifffile.imwrite(path, np.ones(shape, dtype), photometric="rgb" if len(shape) == 3 else None)
    with pytest.raises(DataError, match=message):
        read_xyz(path)


@pytest.mark.parametrize("value", [1e19, -2e3, 1e300])
def test_absurd_coordinates_are_an_error_naming_the_file(value: float, tmp_path: Path) -> None:
    xyz = np.full((8, 8, 3), 0.1, np.float64)
    xyz[3, 4, 2] = value
    path = tmp_path / "far.tiff"
    tifffile.imwrite(path, xyz, photometric="rgb")
    with pytest.raises(DataError, match="must be at most 1000 m") as raised:
        read_xyz(path)
    assert raised.value.path == path


def test_non_finite_points_stay_invalid_points(tmp_path: Path) -> None:
    xyz = np.full((4, 4, 3), 0.1, np.float32)
    xyz[0, 0] = [np.nan, 0, 0]
    xyz[1, 1] = [np.inf, 1, 1]
    path = tmp_path / "holes.tiff"
    write_xyz(path, xyz)
    read = read_xyz(path)
    assert (read[0, 0] == 0).all() and (read[1, 1] == 0).all() and (read[2, 2] == np.float32(0.1)).all()


def test_dbscan_refuses_an_extent_that_would_overflow_int64() -> None:
    points = np.zeros((40, 3))
    points[:20] = np.random.default_rng(0).normal(size=(20, 3)) * 1e-3
    points[20:] = 1e19
    with pytest.raises(ValueError, match="overflow int64"):
        dbscan_labels(points, eps=0.006, min_points=5)


def test_overflow_in_cleaning_is_a_data_error_naming_the_file(tiny_dataset: Path) -> None:
    record = list_records(tiny_dataset, "puck", "test")[0]
    sample = load_sample(record)
    sample.xyz[sample.valid] *= np.float32(1e17)  # past the reader's bound: what a direct API caller could pass
    with pytest.raises(DataError) as raised:
        preprocess_sample(sample, "cfm")
    assert raised.value.path == record.xyz_path


def test_a_batch_with_hostile_files_scores_every_other_sample(hostile_run, tiny_dataset: Path, tmp_path: Path) -> None:
    """Bombs, absurd clouds and garbage are each one error naming the file; the good samples are all scored."""
    run, cache = hostile_run
    trained = load_trained(run_models(run)["puck"], cache_dir=str(cache))
    trained.fallback = None  # every bad file is then an error, not a degraded prediction
    source = list_records(tiny_dataset, "puck", "test")[:6]
    records = [copy_record(r, tmp_path / f"s{i}") for i, r in enumerate(source)]
    records[1].rgb_path.write_bytes(png_declaring(30000, 30000))
    far = tifffile.imread(records[3].xyz_path).astype(np.float64)
    far[far != 0] *= 1e19
    tifffile.imwrite(records[3].xyz_path, far, photometric="rgb")
    tiff_declaring(records[4].xyz_path, 20000, 20000)
    records[5] = replace(records[5], gt_path=tmp_path / "mask.png")
    (tmp_path / "mask.png").write_bytes(png_declaring(30000, 30000, mode=0))
    errors: list[DataError] = []
    predictions = list(predict_records(trained, records, errors=errors))
    assert sorted(p.record.rgb_path for p in predictions) == sorted([records[0].rgb_path, records[2].rgb_path])
    assert sorted(e.path for e in errors) == sorted(
        [records[1].rgb_path, records[3].xyz_path, records[4].xyz_path, tmp_path / "mask.png"]
    )


def test_stored_maps_are_checked_for_size_and_finite_values(tmp_path: Path) -> None:
    from mmiad.data.io import read_map

    nan_map = np.zeros((8, 8), np.float32)
    nan_map[2, 2] = np.nan
    tifffile.imwrite(tmp_path / "nan.tiff", nan_map)
    with pytest.raises(DataError, match="NaN or infinite"):
        read_map(tmp_path / "nan.tiff")
    tiff_declaring(tmp_path / "big.tiff", 20000, 20000)
    with pytest.raises(DataError, match="above the limit"):
        read_map(tmp_path / "big.tiff")
