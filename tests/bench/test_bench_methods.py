"""The benchmarks take their methods from the registry: no list of method names to forget a new one in."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from mmiad.bench.comparison import bench_methods
from mmiad.methods import registry
from mmiad.methods.cfm.model import CFM, CFMConfig


class _ToyConfig(CFMConfig):
    paper_extractors = "wrn50-pointmae"


@pytest.fixture
def toys() -> Iterator[None]:
    registry.register_method("toy_trained")(type("ToyTrained", (CFM,), {"config_class": _ToyConfig}))
    registry.register_method("toy_zero_shot")(type("ToyZeroShot", (CFM,), {"needs_training": False}))
    yield
    registry._REGISTRY.pop("toy_trained")
    registry._REGISTRY.pop("toy_zero_shot")


def test_compare_benchmarks_every_trained_method_with_its_paper_backbone(toys: None) -> None:
    methods = bench_methods()
    assert {"btf", "cfm", "m3dm", "unircm", "toy_trained"} <= set(methods) and "toy_zero_shot" not in methods
    assert methods["btf"][1] == {"extractors": "wrn50-fpfh", "random_init": True}
    assert methods["cfm"] == ({"epochs": 30}, {"epochs": 30, "extractors": "dino-pointmae", "random_init": True})
    assert methods["toy_trained"] == ({}, {"extractors": "wrn50-pointmae", "random_init": True})
