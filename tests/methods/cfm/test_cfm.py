from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mmiad.data.mvtec3d import list_records
from mmiad.engine import TrainedModel, load_trained, save_trained, select_few_shot
from mmiad.features.weights import MissingWeightsError
from mmiad.methods.cfm import CFM, CFMConfig
from mmiad.methods.cfm.mapping import FeatureProjectionMLP, feature_discrepancy
from mmiad.methods.cfm.scoring import aggregate, finalize_map
from mmiad.methods.modelfile import ModelFileError, load_model_file, save_model_file

SMALL = {"image_size": 64, "grid_size": 32, "batch_size": 2}


def test_mlp_shapes_and_official_key_names() -> None:
    mlp = FeatureProjectionMLP(768, 1152)
    assert mlp.input.out_features == 960 and mlp.output.out_features == 1152
    assert sorted(mlp.state_dict()) == sorted(
        f"{layer}.{kind}" for layer in ("input", "projection", "output") for kind in ("weight", "bias")
    )
    assert sum(p.numel() for p in mlp.parameters()) == pytest.approx(2.77e6, rel=0.01)


def test_discrepancy_is_distance_of_normalised_vectors() -> None:
    predicted = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    observed = torch.tensor([[0.0, 2.0], [2.0, 2.0]])
    np.testing.assert_allclose(feature_discrepancy(predicted, observed).numpy(), [2**0.5, 0.0], atol=1e-6)


def test_aggregations() -> None:
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.5])
    assert aggregate(a, b, "product").tolist() == [3.0, 1.0]
    assert aggregate(a, b, "sum").tolist() == [4.0, 2.5]
    assert aggregate(a, b, "max").tolist() == [3.0, 2.0]
    assert aggregate(a, b, "2d").tolist() == [1.0, 2.0] and aggregate(a, b, "3d").tolist() == [3.0, 0.5]
    with pytest.raises(ValueError):
        aggregate(a, b, "mean")


def test_compat_normalisations_follow_the_official_code() -> None:
    combined = torch.zeros(8, 8)
    combined[2, 2], combined[5, 5] = 4.0, 1.0
    scored = finalize_map(combined, out_size=8, smoothing="none", sigma=4.0, compat=True)
    # non-zero mean = 2.5; mean over all 64 pixels = 5/64.
    assert torch.allclose(scored.metric_maps["aupro"], combined / 2.5)
    assert torch.allclose(scored.metric_maps["pixel_auroc"], combined / (5 / 64) ** 0.5)
    assert scored.score == pytest.approx(4.0 / 2.5**0.5)
    plain = finalize_map(combined, out_size=16, smoothing="none", sigma=4.0, compat=False)
    assert plain.anomaly_map.shape == (16, 16) and plain.metric_maps == {}
    assert plain.score == float(plain.anomaly_map.max())


def test_compat_switches_smoothing_and_config_validation() -> None:
    assert CFMConfig(compat=True).resolved().smoothing == "box_cascade"
    assert CFMConfig().smoothing == "gaussian"
    with pytest.raises(ValueError, match="aggregation"):
        CFMConfig(aggregation="avg")
    with pytest.raises(ValueError, match="grid_size"):
        CFMConfig(image_size=64, grid_size=128)


@pytest.fixture(scope="module")
def fitted(tiny_dataset: Path, tmp_path_factory) -> tuple[CFM, list, str]:
    cache = str(tmp_path_factory.mktemp("cache"))
    train = list_records(tiny_dataset, "puck", "train")
    model = CFM(cache_dir=cache, epochs=40, **SMALL).fit(train)
    return model, list_records(tiny_dataset, "puck", "test"), cache


def test_training_reduces_the_loss(fitted) -> None:
    model, _, _ = fitted
    assert len(model.loss_history_) == 40
    assert model.loss_history_[-1] < 0.7 * model.loss_history_[0]


def test_predictions_zero_on_background_and_keep_modality_maps(fitted) -> None:
    model, test, _ = fitted
    prediction = next(model.predict(test[:1]))
    assert set(prediction.modality_maps) == {"2d", "3d"}
    assert prediction.modality_maps["2d"].shape == (32, 32)
    background = ~prediction.geometry.valid
    assert prediction.modality_maps["3d"][0, 0] == 0.0 and background[0, 0]


def test_feature_cache_is_reused_between_fit_and_predict(fitted) -> None:
    model, test, _ = fitted
    cache = model.pipeline.cache
    before = cache.hits
    list(model.predict(test))
    list(model.predict(test))
    assert cache.hits - before >= len(test)


def test_model_refuses_other_extractors(fitted, tmp_path: Path) -> None:
    model, _, cache = fitted
    path = save_trained(tmp_path / "m.safetensors", TrainedModel(model, None, {}))
    tensors, config = load_model_file(path)
    config["pipeline"]["point"]["normal_max_nn"] = 7
    save_model_file(tmp_path / "tampered.safetensors", tensors, config)
    with pytest.raises(ModelFileError, match="other extractors"):
        load_trained(tmp_path / "tampered.safetensors", cache_dir=cache)


def test_intramodal_ablation_maps_each_modality_to_itself(tiny_dataset: Path, tmp_path: Path) -> None:
    train = list_records(tiny_dataset, "puck", "train")[:2]
    model = CFM(cache_dir=str(tmp_path), epochs=1, mapping="intramodal", **SMALL).fit(train)
    assert model.map_to_3d_.input.in_features == model.map_to_3d_.output.out_features
    assert model.map_to_2d_.input.in_features == model.map_to_2d_.output.out_features


def test_few_shot_draw_is_seeded_and_recorded() -> None:
    records = list(range(20))
    first, indices = select_few_shot(records, 5, seed=3)
    _, same = select_few_shot(records, 5, seed=3)
    _, different = select_few_shot(records, 5, seed=4)
    assert indices == same and indices != different and first == [records[i] for i in indices]
    assert len(set(indices)) == 5 and indices == sorted(indices)
    assert select_few_shot(records[:3], 5, seed=0)[1] == [0, 1, 2]


@pytest.mark.parametrize(("preset", "channels"), [("dino-pointmae-t", (768, 384)), ("dino-pointmae-s", (768, 1152))])
def test_pruned_deep_presets_train_with_random_weights(tiny_dataset: Path, tmp_path: Path, preset, channels) -> None:
    train = list_records(tiny_dataset, "block", "train")[:2]
    with pytest.warns(UserWarning, match="RANDOM weights"):
        model = CFM(cache_dir=str(tmp_path), extractors=preset, random_init=True, epochs=1, **SMALL)
        model.fit(train)
    assert (model.map_to_3d_.input.in_features, model.map_to_2d_.input.in_features) == channels
    prediction = next(model.predict(list_records(tiny_dataset, "block", "test")[:1]))
    assert np.isfinite(prediction.pred_score)
    # The model file round-trips with a deep preset too (its config holds tuples that JSON turns into lists).
    path = save_trained(tmp_path / "deep.safetensors", TrainedModel(model, None, {}))
    with pytest.warns(UserWarning, match="RANDOM weights"):
        reloaded = load_trained(path, cache_dir=str(tmp_path)).model
    again = next(reloaded.predict(list_records(tiny_dataset, "block", "test")[:1]))
    assert again.pred_score == pytest.approx(prediction.pred_score, rel=1e-5)


def test_deep_preset_without_weights_names_the_missing_file(tiny_dataset: Path, tmp_path: Path) -> None:
    model = CFM(cache_dir=str(tmp_path), extractors="dino-pointmae", weights_dir=str(tmp_path / "weights"), **SMALL)
    with pytest.raises(MissingWeightsError, match=r"dino_vitbase8_pretrain\.pth"):
        model.fit(list_records(tiny_dataset, "block", "train")[:1])
