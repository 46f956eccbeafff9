"""G2SF end to end on tiny data: two categories round-trip through model files, the dataset stays untouched,
the Eyecandies layout synthesises too, and the scores follow the stored statistics."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from mmiad.data.formats import open_dataset
from mmiad.data.synthetic import generate_dataset
from mmiad.engine import TrainedModel, load_trained, save_trained
from mmiad.methods.g2sf import G2SF
from mmiad.methods.g2sf.lspn import pair_score

TINY = {**G2SF.tiny_hparams, "n_anomalies": 4}


def tree_digest(root: Path) -> str:
    """SHA-256 over every file's relative path, bytes and mtime under ``root``."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
        digest.update(str(path.stat().st_mtime_ns).encode())
    return digest.hexdigest()


def test_two_categories_round_trip_and_leave_the_dataset_unchanged(tiny_dataset: Path, tmp_path: Path) -> None:
    before = tree_digest(tiny_dataset)
    dataset = open_dataset(tiny_dataset)
    train = {c: dataset.records(c, "train") for c in dataset.categories()}
    assert len(train) == 2
    cache = tmp_path / "cache"
    sources = G2SF(**TINY).fit_shared(train)
    assert {r.category for r in sources} == set(train)  # cross-category anomaly sources
    for category, records in train.items():
        model = G2SF(cache_dir=str(cache), **TINY)
        model.use_shared(sources)
        model.fit(records)
        assert sorted(p.name for p in (cache / "g2sf" / "pseudo" / category).iterdir()) == [
            f"{i:04d}.npz" for i in range(TINY["n_anomalies"])
        ]
        test = dataset.records(category, "test")
        scores = [p.pred_score for p in model.predict(test)]
        path = save_trained(tmp_path / f"{category}.safetensors", TrainedModel(model, None, {"category": category}))
        loaded = load_trained(path, cache_dir=str(cache))
        assert [p.pred_score for p in loaded.model.predict(test)] == scores
        facts = loaded.model.learned_facts()
        assert facts["mu"] == pytest.approx([float(v) for v in model.mu_]) and sum(facts["sigma"]) == pytest.approx(1)
    assert tree_digest(tiny_dataset) == before


def test_scores_follow_the_official_formula(tiny_dataset: Path, tmp_path: Path) -> None:
    dataset = open_dataset(tiny_dataset)
    category = dataset.categories()[0]
    model = G2SF(cache_dir=str(tmp_path / "cache"), **TINY).fit(dataset.records(category, "train"))
    record = dataset.records(category, "test")[0]
    prepared = model.pipeline.preprocess([record])
    features = model.pipeline.extract(prepared[0])
    fused, distances = model.patch_scores(features)
    # Re-derive: 6 rank-paired prototypes, w := 1 on background, min over ranks, image score = max.
    from mmiad.methods.g2sf.banks import patch_rows

    rows = patch_rows(features, model.config.rgb_grid, model.config.point_grid)
    found = model.banks_.neighbours(rows, 6)
    per_rank = []
    for rank in range(6):
        protos = model.banks_.coreset_rows(found.indices, rank, 6)
        score, _, _ = pair_score(
            model.lspn_, model.scale_(), found.features, protos, model.banks_.split, model.mu_, found.background
        )
        per_rank.append(score)
    expected = torch.stack(per_rank, 1).min(dim=1).values
    torch.testing.assert_close(fused, expected)
    torch.testing.assert_close(distances, found.distances)
    scored = model.score([features])[0]
    assert scored.score == pytest.approx(float(expected.max()))
    assert scored.anomaly_map.shape == (64, 64) and set(scored.modality_maps) == {"2d", "3d"}
    compat = G2SF.from_state(model.get_config(), model.state_tensors(), compat=True)
    smooth_official = compat.score([features])[0].anomaly_map
    assert not np.allclose(smooth_official, scored.anomaly_map)  # uint8 PIL blur vs float Gaussian
    # The stored statistics are the ones scoring uses; bf16 autocast of the LSPN stays close to fp32.
    tensors = model.state_tensors()
    torch.testing.assert_close(tensors["score_mean"], model.mu_)
    torch.testing.assert_close(tensors["global_scale"], model.scale_.theta.detach())
    assert tensors["bank_stats.rgb"].tolist() == [model.banks_.rgb.mean, model.banks_.rgb.std]
    low = G2SF.from_state(model.get_config(), tensors)
    low.config.precision = "bf16"  # the LSPN's autocast only (the features above were extracted in fp32)
    low.prepare_scoring()
    torch.testing.assert_close(low.patch_scores(features)[0], fused, rtol=0.05, atol=0.05)


@pytest.mark.slow
def test_eyecandies_layout_synthesises_and_trains(tmp_path: Path) -> None:
    root = generate_dataset(tmp_path / "eye", preset="tiny", seed=0, layout="eyecandies", categories=None)
    before = tree_digest(root)
    dataset = open_dataset(root)
    category = dataset.categories()[0]
    model = G2SF(cache_dir=str(tmp_path / "cache"), **TINY).fit(dataset.records(category, "train"))
    assert model.pseudo_counts_["anomalous_patches"] > 0
    predictions = list(model.predict(dataset.records(category, "test")))
    assert predictions and all(np.isfinite(p.pred_score) for p in predictions)
    assert tree_digest(root) == before
