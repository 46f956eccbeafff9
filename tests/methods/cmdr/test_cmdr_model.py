"""CMDR-IAD's training step, preflight, defaults and modalities."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mmiad.data.mvtec3d import list_records
from mmiad.engine import TrainedModel, load_trained, save_trained
from mmiad.methods.cmdr import CMDR, CMDRConfig, scoring
from mmiad.methods.cmdr.networks import build_networks
from mmiad.methods.cmdr.training import _saved_bytes, masked_cosine_loss, plan_training, train_step
from mmiad.utils.budget import MemoryBudgetError


def test_masked_cosine_loss_against_numpy() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(20, 6)), rng.normal(size=(20, 6))
    a[3] = 1e-9  # a near-zero row: normalised with eps 1e-6, so it contributes ~0 similarity
    na = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-6)
    nb = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-6)
    expected = 1 - (na * nb).sum(1).mean()
    assert float(masked_cosine_loss(torch.from_numpy(a), torch.from_numpy(b))) == pytest.approx(expected, rel=1e-6)


def tiny_networks(seed: int = 0) -> dict[str, torch.nn.Module]:
    torch.manual_seed(seed)
    return build_networks(6, 5, 8)


def test_every_loss_uses_the_3d_mask_and_its_own_optimiser() -> None:
    """Background tokens never reach a loss (the 2D ones included); each network steps on its own loss."""
    generator = torch.Generator().manual_seed(1)
    tokens_2d, tokens_3d = torch.randn(64, 6, generator=generator), torch.randn(64, 5, generator=generator)
    foreground = torch.zeros(64, dtype=torch.bool)
    foreground[10:40] = True
    garbage_2d, garbage_3d = tokens_2d.clone(), tokens_3d.clone()
    garbage_2d[~foreground], garbage_3d[~foreground] = 1e3, -1e3
    results = []
    for inputs in ((tokens_2d, tokens_3d), (garbage_2d, garbage_3d)):
        networks = tiny_networks()
        for network in networks.values():
            network.eval()  # no dropout: the two runs must see the same computation
        before = {k: [p.clone() for p in v.parameters()] for k, v in networks.items()}
        optimizers = {k: torch.optim.Adam(v.parameters(), lr=1e-3) for k, v in networks.items()}
        losses = train_step(networks, optimizers, *inputs, foreground)
        assert all(
            any(not torch.equal(a, b) for a, b in zip(before[k], v.parameters(), strict=True))
            for k, v in networks.items()
        )
        results.append(losses)
    # The mappers are token-wise: their losses ignore the background exactly; the decoders mix tokens, so theirs
    # change, but only through their inputs, never through background targets.
    assert results[0]["map2Dto3D"] == pytest.approx(results[1]["map2Dto3D"], rel=1e-6)
    assert results[0]["map3Dto2D"] == pytest.approx(results[1]["map3Dto2D"], rel=1e-6)
    assert set(results[0]) == {"map2Dto3D", "map3Dto2D", "Dec2D", "Dec3D"}


def test_a_non_finite_loss_skips_only_its_network() -> None:
    networks = tiny_networks()
    tokens_2d, tokens_3d = torch.randn(64, 6), torch.randn(64, 5)
    tokens_2d[5] = float("nan")  # reaches every loss that reads 2D features, not Dec3D's
    optimizers = {k: torch.optim.Adam(v.parameters(), lr=1e-3) for k, v in networks.items()}
    before = [p.clone() for p in networks["Dec2D"].parameters()]
    losses = train_step(networks, optimizers, tokens_2d, tokens_3d, torch.ones(64, dtype=torch.bool))
    assert set(losses) == {"Dec3D"}
    assert all(torch.equal(a, b) for a, b in zip(before, networks["Dec2D"].parameters(), strict=True))
    assert train_step(networks, optimizers, tokens_2d, tokens_3d, torch.zeros(64, dtype=torch.bool)) == {}


def test_preflight_extrapolates_the_step_and_refuses_a_small_budget() -> None:
    names = ("map2Dto3D", "map3Dto2D", "Dec2D", "Dec3D")
    small, large = _saved_bytes((6, 5), 8, names), _saved_bytes((6, 5), 16, names)
    predicted = small + (large - small) / (256 - 64) * (24 * 24 - 64)
    assert predicted == pytest.approx(_saved_bytes((6, 5), 24, names), rel=0.1)
    networks = build_networks(6, 5, 24)
    plan = plan_training(networks, (6, 5), 24, memory_budget_gb=4.0)
    parameters = sum(p.numel() * 4 for n in networks.values() for p in n.parameters())
    assert plan.micro_batch == 1 and plan.fixed_bytes > 4 * parameters
    with pytest.raises(MemoryBudgetError, match="grid-size"):
        plan_training(networks, (6, 5), 24, memory_budget_gb=0.01)


def test_cpu_defaults_and_official_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = CMDR(device="cpu")
    assert (cpu.resolved_grid(), cpu.resolved_epochs()) == (56, 50)  # the official epochs, a coarser grid
    assert (CMDR(device="cpu", grid_size=224, epochs=50).resolved_grid(), CMDR(epochs=50).resolved_epochs()) == (
        224,
        50,
    )
    monkeypatch.setattr(CMDR, "_on_cpu", property(lambda self: False))
    accelerator = CMDR()
    assert (accelerator.resolved_grid(), accelerator.resolved_epochs()) == (224, 50)
    config = CMDRConfig()
    assert (config.learning_rate, config.seed, config.modality) == (1e-3, 115, "both")
    for bad in ({"modality": "depth"}, {"grid_size": 12}, {"grid_size": 256}, {"epochs": -1}):
        with pytest.raises(ValueError):
            CMDRConfig(**bad)


@pytest.mark.parametrize(("modality", "networks"), [("rgb", {"Dec2D"}), ("xyz", {"Dec3D"})])
def test_single_modality_trains_and_scores_with_its_branch(
    modality: str, networks: set[str], tiny_dataset: Path, tmp_path: Path
) -> None:
    train = list_records(tiny_dataset, "puck", "train")[:3]
    test = list_records(tiny_dataset, "puck", "test")[:2]
    model = CMDR(cache_dir=str(tmp_path / "c"), image_size=64, grid_size=16, epochs=1, modality=modality).fit(train)
    assert set(model.networks_) == networks and {k.split(".")[0] for k in model.state_tensors()} == networks
    model.prepare_scoring()
    features = model.pipeline.extract(model.pipeline.preprocess(test[:1])[0])
    maps, foreground = model.discrepancies(features)
    if modality == "xyz":
        expected = scoring.xyz_only(maps["Dec3D"])
    else:
        expected = scoring.finalize(scoring.rgb_only_map(maps["Dec2D"], foreground))
    predictions = list(model.predict(test))
    assert predictions[0].pred_score == pytest.approx(expected.score, rel=1e-6)
    assert all(np.isfinite(p.pred_score) for p in predictions)
    path = save_trained(tmp_path / "m.safetensors", TrainedModel(model, None, {"category": "puck"}))
    loaded = load_trained(path, cache_dir=str(tmp_path / "c")).model
    assert loaded.config.modality == modality and loaded.grid_ == 16
    assert [p.pred_score for p in loaded.predict(test)] == pytest.approx([p.pred_score for p in predictions], rel=1e-6)
