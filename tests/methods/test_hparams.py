"""Typed hyperparameters: one type check (CLI, API, model files), the configs' ranges, inference-time keys."""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mmiad.methods  # noqa: F401  (registers the built-in methods)
from mmiad.engine.trained import build_model
from mmiad.methods.cfm.model import CFMConfig
from mmiad.methods.hparams import (
    HparamError,
    attribute_docs,
    build_settings,
    check_hparams,
    check_overrides,
    describe,
    hparams_of,
    parse_text,
    value_fits,
)
from mmiad.methods.modelfile import ModelFileError, check_config_fields
from mmiad.methods.registry import available_methods, get_method
from mmiad.methods.unircm.config import UniRCMConfig

JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=3), max_leaves=5)


@pytest.mark.parametrize("text", ["true", "True", "TRUE", " false", "False", "false"])
def test_true_and_false_in_any_case_are_booleans_from_the_command_line(text: str) -> None:
    expected = text.strip().lower() == "true"
    assert check_hparams(CFMConfig, {"compat": parse_text(text, bool)}, owner="cfm") == {"compat": expected}
    assert check_hparams(CFMConfig, {"compat": expected}, owner="cfm") == {"compat": expected}  # JSON true/false
    settings_ = build_settings(CFMConfig, {"compat": text}, owner="cfm")
    assert settings_.compat is expected  # never the truthy string "False"


@pytest.mark.parametrize("value", ["yes", "1", 1, 0, None, [], "Falsey"])
def test_anything_else_is_not_a_boolean(value: object) -> None:
    with pytest.raises(HparamError, match=r"^compat=.* is not valid for cfm: expected true or false$"):
        check_hparams(CFMConfig, {"compat": value}, owner="cfm")


def test_model_files_are_strict_json_types() -> None:
    """A file is JSON: the command line's text spellings are not accepted there (the file was edited)."""
    check_config_fields("m.safetensors", {"compat": False, "epochs": 3, "sigma": 2}, CFMConfig, "hparams")
    for values, message in (
        ({"compat": "False"}, "field 'hparams.compat' must be bool, got 'False'"),
        ({"epochs": 1.5}, "field 'hparams.epochs' must be int, got 1.5"),
        ({"sigma": math.nan}, "field 'hparams.sigma' must be float"),
        ({"hidden": 3}, "field 'hparams.hidden' is not a setting of CFMConfig"),
    ):
        with pytest.raises(ModelFileError, match=message):
            check_config_fields("m.safetensors", values, CFMConfig, "hparams")


@settings(max_examples=60, deadline=None)
@given(JSON_VALUES)
def test_an_int_field_takes_exactly_the_integers(value: object) -> None:
    is_int = isinstance(value, int) and not isinstance(value, bool)
    assert value_fits(value, int, text=True) is is_int
    if is_int:
        assert check_hparams(CFMConfig, {"seed": value}, owner="cfm") == {"seed": value}
    else:
        with pytest.raises(HparamError, match=r"^seed=.* is not valid for cfm: expected an integer$"):
            check_hparams(CFMConfig, {"seed": value}, owner="cfm")


@settings(max_examples=60, deadline=None)
@given(JSON_VALUES)
def test_a_float_field_takes_finite_numbers_and_an_optional_one_null(value: object) -> None:
    number = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    assert value_fits(value, float) is number
    assert value_fits(value, float | None) is (number or value is None)
    if number:
        converted = check_hparams(CFMConfig, {"sigma": value}, owner="cfm")["sigma"]
        assert isinstance(converted, float) and converted == value


def test_containers_and_descriptions() -> None:
    assert check_hparams(UniRCMConfig, {"point_options": {"a": 1}}, owner="u") == {"point_options": {"a": 1}}
    lambdas = typing.get_type_hints(get_method("m3dm").config_class)["lambdas"]
    assert value_fits([1, 0.1, 1], lambdas) and not value_fits([1, 0.1], lambdas)
    assert not value_fits([1, "x", 1], lambdas)
    assert value_fits([1, 3, 5], tuple[int, ...]) and not value_fits([1, 3.5], tuple[int, ...])
    assert describe(int | None) == "null or an integer"
    assert describe(lambdas) == "a list of 3 numbers"
    assert describe(tuple[int, ...]) == "a list of integers"
    assert describe(dict[str, typing.Any] | None) == "null or a JSON object"
    # Text fields keep the text as typed (a folder called 2024 stays "2024"); null is None where allowed.
    assert parse_text("2024", str | None) == "2024" and parse_text("null", str | None) is None
    assert parse_text('"cpu"', str) == "cpu" and parse_text('"a', str) == '"a'  # a JSON string literal, or text
    assert parse_text("[1, 3]", tuple[int, ...]) == [1, 3] and parse_text("abc", float) == "abc"


@pytest.mark.parametrize(
    ("method", "values", "message"),
    [
        ("cfm", {"epochs": 1.5}, "epochs=1.5 is not valid for cfm: expected an integer"),
        ("cfm", {"seed": {}}, "seed={} is not valid for cfm: expected an integer"),
        ("cfm", {"learning_rate": "abc"}, "learning_rate=abc is not valid for cfm: expected a finite number"),
        ("cfm", {"grid_size": 0}, "grid_size=0 is not valid for cfm: must be in [1, image_size=224]"),
        ("cfm", {"grid_size": 64, "image_size": 32}, "grid_size=64 is not valid for cfm: must be in [1, image"),
        ("cfm", {"aggregation": "mean"}, "aggregation=mean is not valid for cfm: expected one of product, sum"),
        ("cfm", {"pixel_subset": 0}, "pixel_subset=0.0 is not valid for cfm: must be in (0, 1]"),
        ("unircm", {"hidden": 0}, "hidden=0 is not valid for unircm: must be at least 1"),
        ("unircm", {"learning_rate": -1}, "learning_rate=-1.0 is not valid for unircm: must be positive"),
        ("btf", {"coreset_fraction": 1.5}, "coreset_fraction=1.5 is not valid for btf: must be in (0, 1]"),
        ("m3dm", {"point_grid": 0}, "point_grid=0 is not valid for m3dm: must be at least 1"),
        ("m3dm", {"ocsvm_nu": 0}, "ocsvm_nu=0.0 is not valid for m3dm: must be in (0, 1]"),
        ("cfm", {"image_size": 0}, "image_size=0 is not valid for cfm: must be at least 1"),
        ("cfm", {"no_such_key": 1}, "no_such_key is not a hyperparameter of cfm; valid keys: aggregation, batch_size"),
        ("cfm", {"device": "tpu"}, "invalid cfm hyperparameters (device=tpu): "),
    ],
)
def test_build_model_refuses_wrong_types_and_ranges_in_one_line(method: str, values: dict, message: str) -> None:
    with pytest.raises(HparamError) as raised:
        build_model(method, None, values)
    text = str(raised.value)
    assert text.startswith(message) and "\n" not in text


def test_every_config_field_is_documented_and_every_inference_key_is_a_field() -> None:
    for name in available_methods():
        config_class = get_method(name).config_class
        if not dataclasses.is_dataclass(config_class):
            continue
        fields = {f.name for f in dataclasses.fields(config_class)}
        assert set(getattr(config_class, "inference_keys", ())) <= fields, name
        assert all(h.help for h in hparams_of(config_class)), name
    # A subclass's description wins over the base's (BTF documents its own profile default).
    btf = attribute_docs(get_method("btf").config_class)
    assert btf["profile"].startswith("Preprocessing profile; ``none`` is BTF's main setting")
    assert btf["coreset_fraction"] == "Share of the nominal patches each bank keeps (0.1)."  # from BankSettings
    assert attribute_docs(CFMConfig)["extractors"].startswith("Extractor preset")  # from MethodSettings


def test_overrides_of_a_trained_model_take_inference_keys_only() -> None:
    assert check_overrides(CFMConfig, {"aggregation": "sum", "compat": "true"}, owner="cfm") == {
        "aggregation": "sum",
        "compat": True,
    }
    with pytest.raises(HparamError, match=r"^epochs=5 cannot change a trained cfm model .*: aggregation, compat,"):
        check_overrides(CFMConfig, {"epochs": 5}, owner="cfm")
    with pytest.raises(HparamError, match=r"^aggregation=mean is not valid for cfm"):
        check_overrides(CFMConfig, {"aggregation": "mean"}, owner="cfm")
    assert check_overrides(UniRCMConfig, {"beta_2d": 0.1, "orq_normalization": "none"}, owner="unircm")
