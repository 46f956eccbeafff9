"""ONNX export: each graph against the PyTorch code it came from, run in onnxruntime."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from mmiad.cli.export_command import register  # noqa: E402
from mmiad.data.mvtec3d import list_categories, list_records  # noqa: E402
from mmiad.engine import TrainedModel, apply_thresholds, save_trained, write_run_index  # noqa: E402
from mmiad.export import Manifest, OnnxPredictor, export_run, predict_with_onnx  # noqa: E402
from mmiad.export._deps import require_onnxruntime  # noqa: E402
from mmiad.export.extractors import export_image_extractor, export_point_extractor  # noqa: E402
from mmiad.export.runtime import OnnxPointMaeExtractor  # noqa: E402
from mmiad.features.pointmae import PointMaeEncoder, PointMaeExtractor, PointMaePreset  # noqa: E402
from mmiad.features.texture import TextureExtractor  # noqa: E402
from mmiad.features.vit import VisionTransformer, VitExtractor, VitPreset  # noqa: E402
from mmiad.methods.cfm import CFM  # noqa: E402
from mmiad.methods.cfm.export import export_cfm_scorer  # noqa: E402
from mmiad.methods.cfm.scoring import finalize_map  # noqa: E402
from mmiad.methods.modelfile import ModelFileError  # noqa: E402
from mmiad.postprocess.threshold import Thresholds  # noqa: E402

ATOL = 1e-5


def _run(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


@pytest.fixture(scope="module")
def trained(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[CFM, str, Path]:
    category = list_categories(tiny_dataset)[0]
    cache = tmp_path_factory.mktemp("cache")
    model = CFM(cache_dir=str(cache), image_size=64, grid_size=32, epochs=2, batch_size=2)
    model.fit(list_records(tiny_dataset, category, "train"))
    return model, category, cache


def _test_records(root: Path, category: str) -> list:
    """Every second test sample (a defect of each kind and a nominal one), to keep FPFH time down."""
    return list_records(root, category, "test")[::2]


def _test_features(model: CFM, root: Path, category: str) -> list:
    records = model.pipeline.preprocess(_test_records(root, category))
    return [model.pipeline.extract(r) for r in records]


@pytest.mark.parametrize("compat", [False, True])
def test_scorer_matches_score_features_and_finalize_map(
    trained: tuple[CFM, str, Path], tiny_dataset: Path, tmp_path: Path, compat: bool
) -> None:
    model, category, cache = trained
    if compat:  # official behaviour: box-cascade smoothing and the normalised image score
        model = CFM.from_state(model.get_config(), model.state_tensors(), compat=True, cache_dir=str(cache))
    entry = export_cfm_scorer(model, tmp_path)
    assert [o["name"] for o in entry["outputs"]] == ["anomaly_map", "map_2d", "map_3d", "score"]
    features = _test_features(model, tiny_dataset, category)
    scores = []
    for sample in features:
        combined, map_2d, map_3d = model.score_features(sample)
        expected = finalize_map(combined, out_size=64, smoothing=model.settings.smoothing, sigma=4.0, compat=compat)
        grid_2d, grid_3d, foreground = sample.on_grid(32)
        final, got_2d, got_3d, score = _run(
            tmp_path / entry["file"],
            {"grid_2d": grid_2d.numpy(), "grid_3d": grid_3d.numpy(), "foreground": foreground.numpy()},
        )
        assert final.shape == (64, 64) and score.shape == ()
        np.testing.assert_allclose(got_2d, map_2d.numpy(), atol=ATOL)
        np.testing.assert_allclose(got_3d, map_3d.numpy(), atol=ATOL)
        np.testing.assert_allclose(final, expected.anomaly_map.numpy(), atol=ATOL)
        assert float(score) == pytest.approx(expected.score, abs=ATOL)
        scores.append(float(score))
    assert len(set(scores)) > 1  # distinct samples, distinct scores: the comparison is not between constants


def _tiny_vit(pos_grid: int) -> VitExtractor:
    torch.manual_seed(0)
    preset = VitPreset("tiny", 32, 2, 2, 8, pos_grid, False, 2, ())
    model = VisionTransformer(preset)
    torch.nn.init.normal_(model.pos_embed, std=0.5)
    torch.nn.init.normal_(model.cls_token, std=0.5)
    return VitExtractor(model, "random-0")


@pytest.mark.parametrize("pos_grid", [4, 6])  # 6: the position embedding is resized bicubically in the graph
def test_vit_export_matches_extract_with_dynamic_batch(tmp_path: Path, pos_grid: int) -> None:
    extractor = _tiny_vit(pos_grid)
    entry = export_image_extractor(extractor, tmp_path, 32)
    assert entry["outputs"][0]["shape"] == ["batch", 32, 4, 4]
    for batch in (1, 3):
        rgb = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        (got,) = _run(tmp_path / entry["file"], {"rgb": rgb.numpy()})
        np.testing.assert_allclose(got, extractor.extract(rgb).numpy(), atol=1e-4, rtol=1e-4)


def test_texture_export_matches_extract(tmp_path: Path) -> None:
    extractor = TextureExtractor()
    entry = export_image_extractor(extractor, tmp_path, 32)
    for batch in (1, 3):
        rgb = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        (got,) = _run(tmp_path / entry["file"], {"rgb": rgb.numpy()})
        expected = extractor.extract(rgb).numpy()
        assert got.shape == expected.shape == (batch, extractor.out_channels, 4, 4)
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_pointmae_encoder_export_has_dynamic_groups(tmp_path: Path) -> None:
    torch.manual_seed(0)
    encoder = PointMaeEncoder(keep_blocks=2, layers=(0, 1), dim=32, num_heads=2)
    for module in encoder.modules():  # non-trivial running statistics, so BatchNorm is really exercised
        if isinstance(module, torch.nn.BatchNorm1d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    extractor = PointMaeExtractor(encoder, PointMaePreset("tiny", 16, 8, 2, (0, 1)), "random-0")
    entry = export_point_extractor(extractor, tmp_path)
    generator = torch.Generator().manual_seed(2)
    for groups, size in ((3, 5), (200, 8)):  # 200 groups: more than one Mini-PointNet chunk in PyTorch
        neighborhoods = torch.randn(groups, size, 3, generator=generator)
        centres = torch.randn(groups, 3, generator=generator)
        (got,) = _run(tmp_path / entry["file"], {"neighborhoods": neighborhoods.numpy(), "centres": centres.numpy()})
        with torch.no_grad():
            expected = encoder.eval()(neighborhoods, centres).numpy()
        assert got.shape == (groups, 64)
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
    # The runtime's extractor (Python grouping + ONNX encoder) against the PyTorch extractor on a whole cloud.
    rng = np.random.default_rng(3)
    xyz = rng.normal(size=(16, 16, 3)).astype(np.float32)
    valid = rng.random((16, 16)) > 0.3
    runtime = OnnxPointMaeExtractor(tmp_path / entry["file"], extractor.config(), extractor.out_channels)
    got_points, expected_points = runtime.extract(xyz, valid), extractor.extract(xyz, valid)
    assert got_points.features.shape == (16, 64)
    np.testing.assert_allclose(got_points.features.numpy(), expected_points.features.numpy(), atol=1e-4, rtol=1e-4)
    assert torch.equal(got_points.neighbors, expected_points.neighbors)
    assert torch.equal(got_points.pixel_index, expected_points.pixel_index)


@pytest.fixture(scope="module")
def exported(trained: tuple[CFM, str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    model, category, _ = trained
    run = tmp_path_factory.mktemp("run")
    thresholds = Thresholds(image=0.05, pixel=0.04, max_fpr=0.01, source="test")
    path = save_trained(run / f"{category}.safetensors", TrainedModel(model, thresholds, {"category": category}))
    write_run_index(run, "cfm", False, [category], {category: path})
    out = tmp_path_factory.mktemp("export")
    export_run(run, out)
    return run, out


def test_manifest_describes_the_export(trained: tuple[CFM, str, Path], exported: tuple[Path, Path]) -> None:
    model, category, _ = trained
    manifest = Manifest.read(exported[1] / category)
    assert manifest.method == "cfm" and manifest.opset == 17
    assert (manifest.image_size, manifest.grid_size, manifest.extractors) == (64, 32, "weightfree")
    assert set(manifest.graphs) == {"image_extractor", "scorer"}  # FPFH stays in Python
    assert manifest.thresholds == {"image": 0.05, "pixel": 0.04, "max_fpr": 0.01, "source": "test"}
    assert manifest.pipeline == model.pipeline.config()
    assert manifest.model_config["category"] == category
    scorer = {i["name"]: i["shape"] for i in manifest.graphs["scorer"]["inputs"]}
    assert scorer == {
        "grid_2d": [model.map_to_2d_.output.out_features, 32, 32],
        "grid_3d": [33, 32, 32],
        "foreground": [32, 32],
    }
    assert json.loads((exported[1] / "index.json").read_text())["models"] == {category: category}


def test_onnx_predictions_equal_torch_predictions(
    trained: tuple[CFM, str, Path], exported: tuple[Path, Path], tiny_dataset: Path
) -> None:
    model, category, cache = trained
    records = _test_records(tiny_dataset, category)
    thresholds = Thresholds(image=0.05, pixel=0.04, max_fpr=0.01, source="test")
    expected = [apply_thresholds(p, thresholds) for p in model.predict(records)]
    got = list(predict_with_onnx(exported[1], records, category=category, cache_dir=cache))
    assert [p.record.stem for p in got] == [p.record.stem for p in expected] and len(got) == len(records)
    for onnx_pred, torch_pred in zip(got, expected, strict=True):
        assert onnx_pred.pred_score == pytest.approx(torch_pred.pred_score, abs=ATOL)
        np.testing.assert_allclose(onnx_pred.anomaly_map, torch_pred.anomaly_map, atol=ATOL)
        for name in ("2d", "3d"):
            np.testing.assert_allclose(onnx_pred.modality_maps[name], torch_pred.modality_maps[name], atol=ATOL)
        assert onnx_pred.label == torch_pred.label
        if abs(torch_pred.pred_score - thresholds.image) > ATOL:
            assert onnx_pred.pred_label == torch_pred.pred_label


def test_cli_export_writes_one_folder_per_model(exported: tuple[Path, Path], tmp_path: Path) -> None:
    run, _ = exported
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    category = json.loads((run / "run.json").read_text())["categories"][0]
    args = parser.parse_args(["export", "--run", str(run), "--out", str(tmp_path / "x"), "--category", category])
    assert args.handler(args) == 0
    assert sorted(p.name for p in (tmp_path / "x" / category).iterdir()) == [
        "image_extractor.onnx",
        "manifest.json",
        "scorer.onnx",
    ]
    predictor = OnnxPredictor.from_export(tmp_path / "x")  # the only model: no --category needed
    assert predictor.thresholds is not None and predictor.thresholds.image == 0.05


def test_bad_export_folders_and_missing_packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ModelFileError, match="not an ONNX export"):
        OnnxPredictor.from_export(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ModelFileError, match="not an mmiad ONNX manifest"):
        Manifest.read(tmp_path)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r"pip install mmiad\[onnx\]"):
        require_onnxruntime()
