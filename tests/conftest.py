"""Shared fixtures: tiny synthetic datasets written once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``tiny`` synthetic preset (2 categories, 64×64) in the MVTec 3D-AD layout."""
    from mmiad.data.synthetic import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("tiny") / "data", preset="tiny", seed=0)


TINY_HPARAMS: dict[str, dict] = {
    "cfm": {"image_size": 64, "grid_size": 32, "epochs": 3, "batch_size": 2},
    "btf": {"image_size": 64, "grid_size": 8},
    "m3dm": {"image_size": 64, "rgb_grid": 8, "point_grid": 16, "epochs": 2, "batch_size": 2},
    "unircm": {
        "image_size": 64,
        "grid_size": 8,
        "hidden": 16,
        "num_blocks": 1,
        "epochs": 2,
        "batch_size": 2,
        "orq_layers": 2,
        "codebook_size_2d": 8,
        "codebook_size_3d": 8,
        "orq_iterations": 3,
        "device": "cpu",
    },
}


@pytest.fixture(scope="session")
def tiny_hparams() -> dict[str, dict]:
    """Per method, settings small enough for the ``tiny`` dataset (seconds per fit), shared by every test."""
    return {name: dict(values) for name, values in TINY_HPARAMS.items()}
