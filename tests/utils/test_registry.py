"""The generic registry, and the three registries built on it (methods, dataset formats, extractors)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import mmiad.methods  # noqa: F401  (registers the built-in methods)
from mmiad.data import formats as format_registry
from mmiad.data.mvtec3d import MVTec3D
from mmiad.features import registry as extractor_registry
from mmiad.methods import registry as method_registry
from mmiad.methods.cfm.model import CFM
from mmiad.utils.registry import Registry, RegistryError


def test_register_get_list_and_refuse_a_second_entry_under_a_taken_name() -> None:
    registry: Registry[object] = Registry("widget")
    first, second = object(), object()
    assert registry.register("b", first) is first
    registry.register("a", second)
    assert registry.names() == ["a", "b"] and list(registry) == ["b", "a"] and len(registry) == 2
    assert registry.get("b") is first and registry["a"] is second and "a" in registry
    registry.register("b", first)  # the same entry again (a module imported twice) is fine
    with pytest.raises(RegistryError, match=r"^widget name 'b' is already registered \(by object\); choose"):
        registry.register("b", second)
    assert registry.get("b") is first  # the refused entry did not replace it
    with pytest.raises(RegistryError, match=r"^unknown widget 'c'; available: a, b$"):
        registry.get("c")
    with pytest.raises(RegistryError, match="invalid widget name ''"):
        registry.register("", object())
    assert registry.pop("a") is second and registry.pop("a") is None and registry.names() == ["b"]


def test_an_empty_registry_says_so_and_order_and_identity_are_configurable() -> None:
    with pytest.raises(RegistryError, match="unknown thing 'x'; available: none registered"):
        Registry[int]("thing").get("x")
    ranked: Registry[int] = Registry("rank", order=lambda name, value: -value, identity=lambda value: value % 10)
    ranked.register("low", 1)
    ranked.register("high", 3)
    assert ranked.names() == ["high", "low"]
    ranked.register("low", 1)  # identity 1 is 1: the same entry
    with pytest.raises(RegistryError, match="already registered"):
        ranked.register("low", 2)


@pytest.fixture
def cleanup() -> Iterator[None]:
    yield
    method_registry._REGISTRY.pop("toy_dup", None)
    format_registry._FORMATS.pop("toy_dup", None)
    extractor_registry._IMAGE.pop("toy_dup", None)


def test_methods_formats_and_extractors_refuse_duplicates_with_the_same_message_shape(cleanup: None) -> None:
    with pytest.raises(RegistryError, match=r"^method name 'cfm' is already registered \(by CFM\)"):
        method_registry.register_method("cfm")(type("Other", (CFM,), {}))
    assert method_registry.get_method("cfm") is CFM
    with pytest.raises(RegistryError, match=r"^dataset format name 'mvtec3d' is already registered \(by MVTec3D\)"):
        format_registry.register_format("mvtec3d")(type("Other", (MVTec3D,), {}))
    assert format_registry.get_format("mvtec3d") is MVTec3D

    def factory(**_: object) -> None:
        return None

    def other_factory(**_: object) -> None:
        return None

    extractor_registry.register_image_extractor("toy_dup", factory, "toy", needs_weights=False)
    extractor_registry.register_image_extractor("toy_dup", factory, "toy", needs_weights=False)  # same factory
    with pytest.raises(RegistryError, match=r"^image extractor name 'toy_dup' is already registered \(by factory"):
        extractor_registry.register_image_extractor("toy_dup", other_factory, "toy", needs_weights=False)
    with pytest.raises(RegistryError, match="invalid point extractor name 'a\\+b'"):
        extractor_registry.register_point_extractor("a+b", factory, "toy", needs_weights=False)


def test_unknown_names_list_what_is_registered() -> None:
    names = method_registry.available_methods()
    assert {"btf", "cfm", "m3dm", "unircm"} <= set(names) and names == sorted(names)
    with pytest.raises(ValueError, match=rf"^unknown method 'nope'; available: {', '.join(names)}$"):
        method_registry.get_method("nope")
    # Formats list the most specific first: the order detection tries them in.
    with pytest.raises(ValueError, match=r"^unknown dataset format 'nope'; available: eyecandies, mvtec3d, folder$"):
        format_registry.get_format("nope")
    with pytest.raises(ValueError, match=r"^unknown point extractor 'nope'; available: .*fpfh.*pointmae"):
        extractor_registry.parse_extractors("texture+nope")
