"""MuSc-V2 end to end on the tiny synthetic data: order invariance, subsets, clear errors, the Point-MAE hook."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from mmiad.data.mvtec3d import list_records
from mmiad.methods.musc import BatchTooSmallError, MixedSizeError, MuSc, MuScConfig
from mmiad.methods.musc.tokens import extract_tokens

SMALL = {"image_size": 64, "num_group": 48, "group_size": 16}


@pytest.fixture(scope="module")
def musc_tokens(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory):
    model = MuSc(cache_dir=str(tmp_path_factory.mktemp("musc-cache")), **SMALL)
    records = list_records(tiny_dataset, "puck", "test") + list_records(tiny_dataset, "block", "test")[:2]
    prepared = model.pipeline.preprocess(records)
    return model, [extract_tokens(model.pipeline, record, model.config) for record in prepared]


def test_scores_do_not_depend_on_sample_order(musc_tokens) -> None:
    model, tokens = musc_tokens
    forward = model.score_tokens(tokens)
    order = [5, 2, 7, 0, 3, 1, 6, 4][: len(tokens)]
    shuffled = model.score_tokens([tokens[i] for i in order])
    for position, index in enumerate(order):
        assert shuffled[position].record == forward[index].record
        assert shuffled[position].pred_score == pytest.approx(forward[index].pred_score, rel=1e-5, abs=1e-7)
        np.testing.assert_allclose(shuffled[position].anomaly_map, forward[index].anomaly_map, rtol=1e-5, atol=1e-6)
    assert set(forward[0].modality_maps) == {"2d", "3d"}
    np.testing.assert_allclose(  # the final map is the sum of the modality maps (official)
        forward[0].anomaly_map, forward[0].modality_maps["2d"] + forward[0].modality_maps["3d"], rtol=1e-6
    )


@pytest.mark.parametrize("cae", [True, False])
def test_mutual_scoring_on_each_device_equals_the_cpu(musc_tokens, compute_device: str, cae: bool) -> None:
    """The O(N²) scoring runs on the configured device and hands CPU float32 scores back: identical on the CPU,
    within float rounding of the distance kernels on CUDA."""
    model, tokens = musc_tokens
    on_cpu = MuSc(replace(model.config, device="cpu", cae=cae)).score_tokens(tokens)
    on_device = MuSc(replace(model.config, device=compute_device, cae=cae)).score_tokens(tokens)
    for got, expected in zip(on_device, on_cpu, strict=True):
        assert isinstance(got.pred_score, float)
        if compute_device == "cpu":
            assert got.pred_score == expected.pred_score
            np.testing.assert_array_equal(got.anomaly_map, expected.anomaly_map)
        else:
            assert got.pred_score == pytest.approx(expected.pred_score, rel=1e-4)
            np.testing.assert_allclose(got.anomaly_map, expected.anomaly_map, rtol=1e-4, atol=1e-6)


def test_subset_mode_is_deterministic_under_a_seed(musc_tokens) -> None:
    model, tokens = musc_tokens
    tokens = tokens + tokens[:2]  # 10 samples: two subsets of 5
    first = MuSc(replace(model.config, divide_num=2, seed=3)).score_tokens(tokens)
    again = MuSc(replace(model.config, divide_num=2, seed=3)).score_tokens(tokens)
    whole = MuSc(model.config).score_tokens(tokens)
    assert [p.pred_score for p in first] == [p.pred_score for p in again]
    assert [p.pred_score for p in first] != pytest.approx([p.pred_score for p in whole])


def test_too_small_batches_and_mixed_sizes_are_refused(musc_tokens, tiny_dataset: Path) -> None:
    model, tokens = musc_tokens
    with pytest.raises(BatchTooSmallError, match="at least 5"):
        model.score_tokens(tokens[:4])
    with pytest.raises(BatchTooSmallError, match="at least 5"):
        list(model.predict(list_records(tiny_dataset, "puck", "test")[:3]))
    odd = replace(tokens[0], grid=(4, 4), image=[t[:16] for t in tokens[0].image])
    with pytest.raises(MixedSizeError, match="one input size"):
        model.score_tokens([odd, *tokens[1:]])
    wide = replace(tokens[0], inputs=replace(tokens[0].inputs, original_size=(64, 96)))
    with pytest.raises(MixedSizeError, match=r"mixes image sizes \(64×64, 64×96\)"):
        model.score_tokens([wide, *tokens[1:]])
    assert len(MuSc(replace(model.config, allow_mixed_sizes=True)).score_tokens([wide, *tokens[1:]])) == len(tokens)


def test_single_modalities_and_ablation_switches(musc_tokens, tiny_dataset: Path) -> None:
    model, tokens = musc_tokens
    only_2d = MuSc(replace(model.config, modality="2d")).score_tokens(tokens)
    assert set(only_2d[0].modality_maps) == {"2d"}
    no_cae = MuSc(replace(model.config, cae=False, rscon_k=(0,))).score_tokens(tokens)
    for prediction in no_cae:  # without RsCon the image score is the maximum of the map
        assert prediction.pred_score == pytest.approx(float(prediction.anomaly_map.max()), rel=1e-6)
    with pytest.raises(ValueError, match="unknown MuSc option"):
        MuScConfig.from_options({"r_lst": [1]})


def test_point_mae_hook_matches_plain_extraction_and_takes_ipg(tiny_dataset: Path) -> None:
    from mmiad.features.weights import build_point_extractor
    from mmiad.methods.musc.ipg import make_grouping

    extractor = build_point_extractor("pointmae_keep1", random_init=True, num_group=32, group_size=16)
    xyz = np.zeros((24, 24, 3), np.float32)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:24, 0:24] / 24.0
    xyz[..., 0], xyz[..., 1], xyz[..., 2] = xx, yy, 0.2 * np.sin(3 * xx) + rng.normal(0, 0.01, xx.shape)
    valid = np.ones((24, 24), bool)
    plain = extractor.extract(xyz, valid)
    groups = extractor.extract_groups(xyz, valid)
    torch.testing.assert_close(groups.features.features, plain.features)
    grouping = make_grouping(True, step=6, threshold=0.0)  # every group is "curved": all regrouped by IPG
    regrouped = extractor.extract_groups(xyz, valid, grouping)
    assert torch.equal(regrouped.centre_idx, groups.centre_idx)
    assert not torch.equal(regrouped.member_idx.sort(dim=1).values, groups.member_idx.sort(dim=1).values)
    assert not torch.allclose(regrouped.features.features, plain.features)
