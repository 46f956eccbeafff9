"""Uni-RCM's ONNX scorer against ``UniRCM.predict`` / ``score_grids``, run in onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from mmiad.data.mvtec3d import list_categories, list_records  # noqa: E402
from mmiad.engine import TrainedModel  # noqa: E402
from mmiad.export import Manifest, OnnxPredictor  # noqa: E402
from mmiad.export.graphs import GraphSpec, export_graph  # noqa: E402
from mmiad.export.model import export_model  # noqa: E402
from mmiad.methods.unircm import UniRCM  # noqa: E402
from mmiad.methods.unircm.export import OrqScore, UniRcmScorer  # noqa: E402
from mmiad.methods.unircm.orq import ResidualQuantizer  # noqa: E402

ATOL = 1e-5


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def setup(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory, tiny_hparams: dict) -> dict:
    category = list_categories(tiny_dataset)[0]
    cache = str(tmp_path_factory.mktemp("cache"))
    tiny = {k: v for k, v in tiny_hparams["unircm"].items() if k not in ("branches", "use_orq")}
    train = list_records(tiny_dataset, category, "train")
    models = {
        "rfi+ram": UniRCM(cache_dir=cache, branches="rfi+ram", use_orq=True, **tiny).fit(train),
        "none": UniRCM(cache_dir=cache, branches="none", use_orq=False, **tiny).fit(train),
    }
    # Every second test sample: defects of each kind and a nominal one, at half the FPFH time.
    return {"models": models, "records": list_records(tiny_dataset, category, "test")[::2], "cache": cache}


def test_orq_graph_module_matches_quantizer_and_hand_value() -> None:
    quantizer = ResidualQuantizer([2, 2])
    quantizer.codebooks_ = [torch.tensor([[0.0, 0.0], [10.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])]
    # (9,2) → code (10,0) leaves (-1,2) → code (0,1) (d²=2 < 8) leaves (-1,1): norm √2.
    module = OrqScore(quantizer)
    assert float(module(torch.tensor([[9.0, 2.0]]))[0]) == pytest.approx(2**0.5, abs=1e-6)
    rows = torch.randn(50, 2, generator=torch.Generator().manual_seed(0)) * 6
    torch.testing.assert_close(module(rows), quantizer.score(rows), atol=1e-5, rtol=0)


@pytest.mark.parametrize("branches", ["rfi+ram", "none"])
def test_exported_scorer_equals_predict(setup: dict, tmp_path: Path, branches: str) -> None:
    model: UniRCM = setup["models"][branches]
    manifest = export_model(TrainedModel(model, None, {"category": "x"}), tmp_path)
    assert manifest.method == "unircm" and (manifest.image_size, manifest.grid_size) == (64, 8)
    assert set(manifest.graphs) == {"image_extractor", "scorer"}
    assert Manifest.read(tmp_path).graphs["scorer"]["inputs"][2] == {
        "name": "foreground",
        "shape": [8, 8],
        "dtype": "bool",
    }
    predictor = OnnxPredictor(tmp_path, cache_dir=setup["cache"])
    prepared = model.pipeline.preprocess(setup["records"])
    expected = list(model.predict(setup["records"]))
    assert len(expected) == len(prepared) == len(setup["records"])
    end_to_end = list(predictor.predict(setup["records"]))
    np.testing.assert_allclose([p.pred_score for p in end_to_end], [p.pred_score for p in expected], atol=ATOL)
    scores = []
    for record, torch_pred in zip(prepared, expected, strict=True):
        final, map_2d, map_3d, score = predictor.score_features(model.pipeline.extract(record))
        assert final.shape == (64, 64)
        np.testing.assert_allclose(final, torch_pred.anomaly_map, atol=ATOL)
        np.testing.assert_allclose(map_2d, torch_pred.modality_maps["2d"], atol=ATOL)
        np.testing.assert_allclose(map_3d, torch_pred.modality_maps["3d"], atol=ATOL)
        assert score == pytest.approx(torch_pred.pred_score, abs=ATOL)
        scores.append(score)
        if branches == "rfi+ram":  # the ORQ term really takes part: without it the map would be 2d·3d
            assert torch_pred.modality_maps["orq_2d"].max() > 0 and torch_pred.modality_maps["orq_3d"].max() > 0
    assert len(set(scores)) > 1  # distinct samples, distinct scores: the comparison is not between constants


def test_compat_is_refused_but_its_orq_normalisation_is_exportable(setup: dict, tmp_path: Path) -> None:
    model: UniRCM = setup["models"]["rfi+ram"]
    compat = UniRCM.from_state(model.get_config(), model.state_tensors(), compat=True, cache_dir=setup["cache"])
    with pytest.raises(ValueError, match="compat Uni-RCM cannot be exported"):
        export_model(TrainedModel(compat, None, {}), tmp_path)
    # The dense part of the compat path (max-normalised ORQ maps) at grid resolution, without PIL's blur.
    c = compat.settings
    scorer = UniRcmScorer(
        compat.map_to_3d_,
        compat.map_to_2d_,
        compat.orq_2d_,
        compat.orq_3d_,
        beta_2d=c.beta_2d,
        beta_3d=c.beta_3d,
        normalize_orq=True,
        out_size=8,
        smoothing="none",
        sigma=0.0,
    )
    c2, c3 = compat.map_to_3d_.in_features, compat.map_to_2d_.in_features
    spec = GraphSpec(
        inputs={"grid_2d": [c2, 8, 8], "grid_3d": [c3, 8, 8], "foreground": [8, 8]},
        outputs={"anomaly_map": [8, 8], "map_2d": [8, 8], "map_3d": [8, 8], "score": []},
    )
    example = (torch.randn(c2, 8, 8), torch.randn(c3, 8, 8), torch.ones(8, 8, dtype=torch.bool))
    session = _session(export_graph(scorer, example, tmp_path / "grid.onnx", spec))
    record = compat.pipeline.preprocess(setup["records"][:1])[0]
    grid_2d, grid_3d, foreground = compat.pipeline.extract(record).on_grid(8)
    expected = compat.score_grids(grid_2d.flatten(1).T, grid_3d.flatten(1).T, foreground.flatten())
    assert float(expected["orq_2d"].max()) == pytest.approx(1.0)  # normalised per image
    got = session.run(None, {"grid_2d": grid_2d.numpy(), "grid_3d": grid_3d.numpy(), "foreground": foreground.numpy()})
    np.testing.assert_allclose(got[0], expected["combined"].numpy(), atol=ATOL)
