"""Shared fixtures: tiny synthetic datasets written once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``tiny`` synthetic preset (2 categories, 64×64) in the MVTec 3D-AD layout."""
    from mmiad.data.synthetic import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("tiny") / "data", preset="tiny", seed=0)
