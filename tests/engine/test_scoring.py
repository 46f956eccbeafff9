"""The one scoring loop: each input file decoded once, one rule for a missing modality, the same for every path."""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from mmiad.cli.main import main
from mmiad.data import formats
from mmiad.data.io import read_xyz, write_xyz
from mmiad.data.mvtec3d import list_records
from mmiad.engine import evaluate_run, train_run
from mmiad.methods.registry import get_method


@pytest.fixture(scope="module")
def run(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """A tiny CFM run on a copy of ``puck`` (the tests break some of its files), and its cache."""
    root = tmp_path_factory.mktemp("scoring")
    data = root / "data"
    shutil.copytree(tiny_dataset / "puck", data / "puck")
    cache = str(root / "cache")
    train_run("cfm", data, root / "run", hparams=dict(get_method("cfm").tiny_hparams), cache_dir=cache)
    return data, root / "run", cache


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> Counter[Path]:
    """How many times each file is decoded as an RGB image or a point cloud, through any format reader."""
    counts: Counter[Path] = Counter()
    read_rgb, read_xyz_file = formats.read_rgb, formats.read_xyz

    def counting_rgb(path: Path) -> np.ndarray:
        counts[Path(path).resolve()] += 1
        return read_rgb(path)

    def counting_xyz(path: Path) -> np.ndarray:
        counts[Path(path).resolve()] += 1
        return read_xyz_file(path)

    monkeypatch.setattr(formats, "read_rgb", counting_rgb)
    monkeypatch.setattr(formats, "read_xyz", counting_xyz)
    return counts


def _inputs(records: list, target: Path) -> Path:
    target.mkdir(parents=True)
    for record in records:
        shutil.copy(record.rgb_path, target / f"{record.defect_type}_{record.stem}.png")
        shutil.copy(record.xyz_path, target / f"{record.defect_type}_{record.stem}.tiff")
    return target


def test_test_and_predict_decode_every_input_file_once(run, decodes: Counter[Path], tmp_path: Path) -> None:
    data, run_dir, cache = run
    tests = list_records(data, "puck", "test")
    inputs = {Path(p).resolve() for r in tests for p in (r.rgb_path, r.xyz_path)}
    for attempt in ("cold caches", "warm caches"):
        decodes.clear()
        result, errors = evaluate_run(run_dir, data, cache_dir=cache)
        assert errors == [] and result["per_category"]["puck"]["image_auroc"] is not None
        read = {path: n for path, n in decodes.items() if path in inputs}
        # Cold: every input decoded once (preprocessed and resized from that one read). Warm: the features come
        # from the cache and only the model input is read, from the preprocessed copy of the cloud.
        expected = (
            {path: 1 for path in inputs} if attempt == "cold caches" else {Path(r.rgb_path).resolve(): 1 for r in tests}
        )
        assert read == expected, attempt
    folder = _inputs(tests, tmp_path / "inputs")
    decodes.clear()
    assert (
        main(
            [
                "predict",
                "--run",
                str(run_dir),
                "--input",
                str(folder),
                "--out",
                str(tmp_path / "out"),
                "--cache-dir",
                cache,
            ]
        )
        == 0
    )
    users = {p.resolve() for p in folder.iterdir()}
    assert {path: n for path, n in decodes.items() if path in users} == {path: 1 for path in users}  # overlays too


def test_an_absent_and_an_unreadable_cloud_are_scored_alike(run, tmp_path: Path, capsys) -> None:
    """One rule: an RGB without its cloud and an RGB whose cloud is corrupt are both scored from the RGB by the
    fallback, flagged and explained with the file and the reason (printed and in ``predictions.csv``); with
    ``--require-both`` both are errors and the other samples are still scored."""
    data, run_dir, cache = run
    folder = _inputs(list_records(data, "puck", "test"), tmp_path / "inputs")
    absent, corrupt = sorted(folder.glob("*.tiff"))[:2]
    absent.unlink()
    corrupt.write_bytes(b"not a tiff")
    out = tmp_path / "out"
    predict = ["predict", "--run", str(run_dir), "--input", str(folder), "--cache-dir", cache]
    assert main([*predict, "--out", str(out)]) == 0
    console = capsys.readouterr().err
    rows = {r["name"]: r for r in csv.DictReader((out / "predictions.csv").open())}
    assert len(rows) == len(list(folder.glob("*.png")))
    for cloud in (absent, corrupt):
        row = rows[cloud.stem]
        assert row["degraded"] == "True" and row["modality"] == "2d" and row["label"] in ("0", "1")
        assert str(cloud) in row["note"] and str(cloud) in console  # the file, in the table and on the console
        assert row["xyz_path"] == str(cloud)  # the user's file
    assert "file not found" in rows[absent.stem]["note"] or "not found" in rows[absent.stem]["note"]
    whole = [r for name, r in rows.items() if name not in (absent.stem, corrupt.stem)]
    assert whole and all(r["degraded"] == "False" and r["note"] == "" for r in whole)

    strict = tmp_path / "strict"
    assert main([*predict, "--out", str(strict), "--require-both"]) == 3
    console = capsys.readouterr().err
    kept = {r["name"] for r in csv.DictReader((strict / "predictions.csv").open())}
    assert kept == {r["name"] for r in whole}
    assert str(absent.with_suffix(".png")) in console and str(corrupt) in console


def test_test_reports_and_counts_degraded_samples(run, tmp_path: Path, capsys) -> None:
    data, run_dir, cache = run
    broken_data = tmp_path / "data"
    shutil.copytree(data, broken_data)
    cloud = sorted((broken_data / "puck" / "test" / "good" / "xyz").iterdir())[0]
    write_xyz(cloud, np.zeros_like(read_xyz(cloud)))  # a sensor that wrote an empty scan
    metrics = tmp_path / "metrics.json"
    test = ["test", "--run", str(run_dir), "--data", str(broken_data), "--cache-dir", cache, "--json", str(metrics)]
    assert main(test) == 0
    captured = capsys.readouterr()
    result = json.loads(metrics.read_text())
    assert result["degraded"] == {"puck": 1}
    (sample,) = result["degraded_samples"]
    assert sample["file"].endswith(f"{cloud.stem}.png") and str(cloud) in sample["note"]
    assert str(cloud) in captured.err and "degraded samples" in captured.out and "puck 1" in captured.out

    assert main([*test, "--strict"]) == 0  # the sample is reported as an error and left out of the metrics
    captured = capsys.readouterr()
    strict = json.loads(metrics.read_text())
    assert strict["degraded"] == {"puck": 0} and str(cloud) in captured.err and "--strict" in captured.err
    total = len(list_records(broken_data, "puck", "test"))
    assert strict["per_category"]["puck"] != result["per_category"]["puck"] or total == 1


def test_onnx_predict_scores_a_missing_cloud_degraded_like_the_run(run, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    data, run_dir, cache = run
    assert main(["export", "--run", str(run_dir), "--out", str(tmp_path / "onnx"), "--cache-dir", cache]) == 0
    folder = _inputs(list_records(data, "puck", "test"), tmp_path / "inputs")
    missing = sorted(folder.glob("*.tiff"))[0]
    missing.unlink()
    rows = {}
    for source in (["--run", str(run_dir)], ["--onnx", str(tmp_path / "onnx")]):
        out = tmp_path / source[0].strip("-")
        assert main(["predict", *source, "--input", str(folder), "--out", str(out), "--cache-dir", cache]) == 0
        rows[source[0]] = {r["name"]: r for r in csv.DictReader((out / "predictions.csv").open())}
    torch_row, onnx_row = rows["--run"][missing.stem], rows["--onnx"][missing.stem]
    assert onnx_row["degraded"] == "True" and onnx_row["modality"] == "2d" and str(missing) in onnx_row["note"]
    assert float(onnx_row["score"]) == pytest.approx(float(torch_row["score"]), rel=1e-4)
    assert onnx_row["label"] == torch_row["label"]


def test_native_eyecandies_calibrates_the_fallback_without_plane_removal(tmp_path: Path) -> None:
    """Preprocessing follows the dataset format in one place: the Eyecandies reader removes the background, so
    neither the model nor its fallback calibration runs the MVTec border-plane removal on those clouds (it
    would find no border and skip every validation sample)."""
    from mmiad.data.synthetic import generate_dataset
    from mmiad.engine import load_trained

    data = generate_dataset(tmp_path / "data", preset="tiny", categories=["puck"], layout="eyecandies")
    hparams = {**get_method("cfm").tiny_hparams, "profile": "m3dm"}  # a profile that removes the plane
    files, errors = train_run("cfm", data, tmp_path / "run", hparams=hparams, cache_dir=str(tmp_path / "cache"))
    assert errors == [], [str(e) for e in errors]
    trained = load_trained(files["puck"], cache_dir=str(tmp_path / "cache"))
    assert set(trained.fallback_thresholds) == {"2d", "3d"}


def test_an_extractor_failing_on_one_sample_costs_that_sample_only(run, monkeypatch: pytest.MonkeyPatch) -> None:
    """The extractors see batches of 8; when one cloud breaks the batch, the others are extracted again alone."""
    from mmiad.engine import load_trained, predict_records
    from mmiad.features.pipeline import FeaturePipeline

    data, run_dir, cache = run
    trained = load_trained(run_dir / "puck.safetensors", cache_dir=cache)
    trained.model.pipeline.cache = None  # extract every sample
    records = list_records(data, "puck", "test")
    pipeline = trained.model.pipeline
    bad = pipeline.load_inputs(pipeline.preprocess([records[1]])[0]).xyz.tobytes()
    original = FeaturePipeline.point_features

    def fragile(self: FeaturePipeline, xyz: np.ndarray, valid: np.ndarray):  # type: ignore[no-untyped-def]
        if xyz.tobytes() == bad:
            raise ValueError("degenerate cloud")
        return original(self, xyz, valid)

    monkeypatch.setattr(FeaturePipeline, "point_features", fragile)
    errors: list = []
    predictions = list(predict_records(trained, records, errors=errors))
    assert [p.record for p in predictions] == [r for i, r in enumerate(records) if i != 1]
    assert [str(e) for e in errors] == [f"{records[1].rgb_path}: could not be scored (ValueError: degenerate cloud)"]


def test_the_2d_fallback_is_calibrated_on_the_rgb_a_degraded_sample_has(tiny_dataset: Path, tmp_path: Path) -> None:
    """With a profile that zeroes the RGB background (M3DM's), a sample without its cloud keeps its whole RGB; the
    2D-only fallback's threshold is calibrated on exactly that, as the drop-out simulation scores it."""
    from mmiad.engine import load_trained
    from mmiad.methods.fallback import predict_degraded
    from mmiad.postprocess.threshold import calibrate

    cache = str(tmp_path / "cache")
    hparams = {**get_method("cfm").tiny_hparams, "profile": "m3dm"}
    files, _ = train_run("cfm", tiny_dataset, tmp_path / "run", categories=["puck"], hparams=hparams, cache_dir=cache)
    trained = load_trained(files["puck"], cache_dir=cache)
    assert trained.fallback is not None
    held_out = list_records(tiny_dataset, "puck", "validation")
    degraded = [predict_degraded(trained.model.pipeline, trained.fallback, r, "3d") for r in held_out]
    expected = calibrate([p.pred_score for p in degraded], [p.anomaly_map for p in degraded], 0.01, "validation")
    assert trained.fallback_thresholds["2d"].image == pytest.approx(expected.image, rel=1e-6)
    assert trained.fallback_thresholds["2d"].pixel == pytest.approx(expected.pixel, rel=1e-6)
