"""CFM's ``extend``: a fitted unified CFM trains on, from its weights, on the new categories (mmiad's addition).

The reference below re-derives the continued training from the definitions (seeded epoch order, batches of
``batch_size`` images, loss = per direction one minus the mean cosine over the batch's foreground rows, Adam at the
configured rate), not through the training helpers, and must land on the same weights.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from mmiad.data.mvtec3d import list_records
from mmiad.engine import load_trained, train_run
from mmiad.engine.runs import extend_run, run_models
from mmiad.methods.base import NotFittedError
from mmiad.methods.cfm import CFM

SMALL = {"image_size": 64, "grid_size": 16, "batch_size": 2, "epochs": 2}


def _reference_training(
    model: CFM, rows: list[tuple[torch.Tensor, torch.Tensor]], epochs: int, seed: int
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Copies of both MLPs trained on ``rows`` from their current weights, written out from the definitions."""
    to_3d, to_2d = copy.deepcopy(model.map_to_3d_), copy.deepcopy(model.map_to_2d_)
    optimizer = torch.optim.Adam([*to_3d.parameters(), *to_2d.parameters()], lr=model.config.learning_rate)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(rows), generator=generator).tolist()
        for start in range(0, len(order), model.config.batch_size):
            batch = [rows[i] for i in order[start : start + model.config.batch_size]]
            features_2d = torch.cat([r2 for r2, _ in batch])
            features_3d = torch.cat([r3 for _, r3 in batch])
            cos_3d = torch.nn.functional.cosine_similarity(to_3d(features_2d), features_3d, dim=-1, eps=1e-6)
            cos_2d = torch.nn.functional.cosine_similarity(to_2d(features_3d), features_2d, dim=-1, eps=1e-6)
            optimizer.zero_grad()
            ((1 - cos_3d.mean()) + (1 - cos_2d.mean())).backward()
            optimizer.step()
    return to_3d, to_2d


def test_extend_trains_on_from_the_fitted_weights(tiny_dataset: Path, tmp_path: Path) -> None:
    first = list_records(tiny_dataset, "block", "train")
    added = list_records(tiny_dataset, "puck", "train")
    model = CFM(cache_dir=str(tmp_path), **SMALL).fit(first)
    before = copy.deepcopy(model)
    rows = [model._foreground_rows(f) for _, f in model.pipeline.iter_features(model.pipeline.preprocess(added))]

    model.extend(added, [], epochs=3)

    reference_3d, reference_2d = _reference_training(before, rows, epochs=3, seed=model.config.seed + 1)
    for trained, expected in ((model.map_to_3d_, reference_3d), (model.map_to_2d_, reference_2d)):
        for name, value in trained.state_dict().items():
            torch.testing.assert_close(value, expected.state_dict()[name], rtol=1e-4, atol=1e-6, msg=name)
    assert len(model.loss_history_) == 2 + 3
    assert model.extensions_ == [{"new_samples": len(added), "replayed_samples": 0, "epochs": 3}]
    assert model.n_train_samples_ == len(first) + len(added)
    # extend leaves fit's own result alone: a fresh fit on the same records gives the pre-extend weights exactly.
    again = CFM(cache_dir=str(tmp_path), **SMALL).fit(first)
    for name, value in again.map_to_3d_.state_dict().items():
        torch.testing.assert_close(value, before.map_to_3d_.state_dict()[name], rtol=0, atol=0)


def test_extend_needs_a_fitted_model_and_new_records(tiny_dataset: Path, tmp_path: Path) -> None:
    model = CFM(cache_dir=str(tmp_path), **SMALL)
    with pytest.raises(NotFittedError, match="not fitted"):
        model.extend(list_records(tiny_dataset, "puck", "train"), [], epochs=1)
    model.fit(list_records(tiny_dataset, "block", "train"))
    with pytest.raises(ValueError, match="at least one record"):
        model.extend([], [], epochs=1)


@pytest.mark.slow
def test_add_categories_to_a_unified_cfm_run(tiny_dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cache = str(tmp_path / "cache")
    train_run("cfm", tiny_dataset, run, categories=["block"], unified=True, hparams=SMALL, cache_dir=cache)
    extend_run(run, tiny_dataset, ["puck"], epochs=1, cache_dir=cache, replay=False)
    assert json.loads((run / "run.json").read_text())["categories"] == ["block", "puck"]
    trained = load_trained(next(iter(run_models(run).values())), cache_dir=cache)
    assert trained.model.extensions_ == [
        {"new_samples": len(list_records(tiny_dataset, "puck", "train")), "replayed_samples": 0, "epochs": 1}
    ]
    assert trained.info["categories"] == ["block", "puck"]
