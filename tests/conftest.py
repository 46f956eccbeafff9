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
