"""Shared fixtures: tiny synthetic datasets written once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmiad.utils.compute import available_devices


@pytest.fixture(params=available_devices())
def compute_device(request: pytest.FixtureRequest) -> str:
    """Every device this machine has: the CPU always, CUDA when torch sees one. Device-dependent tests take this
    fixture, so a GPU machine runs them on both with no change."""
    return str(request.param)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``tiny`` synthetic preset (2 categories, 64×64) in the MVTec 3D-AD layout."""
    from mmiad.data.synthetic import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("tiny") / "data", preset="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_hparams() -> dict[str, dict]:
    """Per method, settings small enough for the ``tiny`` dataset (seconds per fit): each method's own
    ``tiny_hparams``, so a new method brings its own."""
    from mmiad.methods.registry import available_methods, get_method

    return {name: dict(get_method(name).tiny_hparams) for name in available_methods()}


@pytest.fixture(scope="session")
def train_tiny_mappings():
    """Train two tiny Uni-RCM mappings (5↔4 channels on a 6×6 grid) from one seed on a fixed random store of
    ``images`` samples, batch 2: ``train(epochs, resume, images=..., num_blocks=...) -> (networks, history)``.
    The resume tests (interrupted, forged and foreign checkpoints) compare such runs with each other."""
    import torch
    from torch import nn

    from mmiad.methods.unircm.blocks import RefGuidedMapping
    from mmiad.methods.unircm.training import train_mappings

    grid = 6

    def train(epochs: int, resume, *, images: int, num_blocks: int) -> tuple[nn.ModuleList, list[float]]:
        generator = torch.Generator().manual_seed(0)
        store = {
            i: (
                torch.randn(grid * grid, 5, generator=generator),
                torch.randn(grid * grid, 4, generator=generator),
                torch.rand(grid * grid, generator=generator) > 0.3,
            )
            for i in range(images)
        }
        torch.manual_seed(1)
        shape = {"hidden": 8, "grid": grid, "num_blocks": num_blocks}
        networks = nn.ModuleList([RefGuidedMapping(5, 4, **shape), RefGuidedMapping(4, 5, **shape)])
        history = train_mappings(
            *networks,
            store,
            sorted(store),
            epochs=epochs,
            batch_size=2,
            learning_rate=1e-2,
            mse_weight=0.01,
            mse_scale=(1.0, 1.0),
            seed=3,
            resume=resume,
        )
        return networks, history

    return train
