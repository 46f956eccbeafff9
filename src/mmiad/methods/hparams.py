"""Typed method hyperparameters: each value checked against its config field's type and range where a model is built.

A method's hyperparameters are the fields of its config dataclass (:class:`~mmiad.methods.settings.MethodSettings`
and subclasses). The dataclass says everything a user-facing layer needs, once:

* the **type** is the field's annotation (``bool``, ``int``, ``float``, ``str``, ``X | None``, tuples, ``dict``);
* the **range** is checked by the config's ``__post_init__`` (:func:`require` gives its one-line message);
* the **help** is the config docstring's ``Attributes:`` entry, the **default** the field's default;
* the keys that still apply to a trained model are the config's ``inference_keys``.

So ``mmiad train --set``, the generated options, ``mmiad import``, ``--set`` with ``--run`` and the Python API all
go through :func:`build_settings` or :func:`check_overrides`, and a wrong value fails before any work with
:class:`HparamError`: one line naming the key, the value and what is allowed (the CLI exits 2). Model files
use the same type check (:func:`value_fits`, through :func:`mmiad.methods.modelfile.check_config_fields`), strictly:
a file is JSON, so the text spellings a command line needs (``true``, ``False``) are not accepted there.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

_MISSING = object()
_BOOL_WORDS = {"true": True, "false": False}


class HparamError(ValueError):
    """A hyperparameter that is unknown, of the wrong type, out of range, or not applicable: a usage error.

    Attributes:
        key: The hyperparameter at fault (None when the message concerns several).
        value: The value given.
        allowed: What would have been accepted.
    """

    def __init__(self, message: str, *, key: str | None = None, value: Any = None, allowed: str = "") -> None:
        super().__init__(message)
        self.key, self.value, self.allowed = key, value, allowed

    @classmethod
    def invalid(cls, key: str, value: Any, allowed: str, owner: str | None = None) -> HparamError:
        """``key=value is not valid for owner: allowed``."""
        where = f" for {owner}" if owner else ""
        return cls(f"{key}={show(value)} is not valid{where}: {allowed}", key=key, value=value, allowed=allowed)


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    """A range check for a config's ``__post_init__``: raise :class:`HparamError` naming the key unless ``ok``.

    Example: ``require(self.grid_size >= 1, "grid_size", self.grid_size, "must be at least 1")``.
    """
    if not ok:
        raise HparamError.invalid(key, value, allowed)


def show(value: Any) -> str:
    """A value as a user would type it: text as is, anything else as JSON."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


# ---------------------------------------------------------------------------------------------------- types
def _union_args(hint: Any) -> tuple[Any, ...] | None:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return None


def convert(value: Any, hint: Any, *, text: bool = True) -> Any:
    """``value`` as the type ``hint`` says, or ``_MISSING`` when it does not fit.

    int is not bool; a float field takes an int (and returns a float) but no NaN or infinity; a tuple field takes
    a list (JSON has no tuples); with ``text``, ``true``/``false`` in any case are booleans.
    """
    union = _union_args(hint)
    if union is not None:
        for arg in sorted(union, key=lambda a: a is str):  # str last: "true" is a bool before it is text
            converted = convert(value, arg, text=text)
            if converted is not _MISSING:
                return converted
        return _MISSING
    if hint is type(None):
        return None if value is None else _MISSING
    if hint is bool:
        if isinstance(value, bool):
            return value
        if text and isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.strip().lower()]
        return _MISSING
    if hint is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _MISSING
    if hint is float:
        number = isinstance(value, int | float) and not isinstance(value, bool)
        return float(value) if number and math.isfinite(value) else _MISSING
    if hint is str:
        return value if isinstance(value, str) else _MISSING
    origin = typing.get_origin(hint) or hint
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            return _MISSING
        args = typing.get_args(hint)
        if not args:
            return origin(value)
        if len(args) == 2 and args[1] is Ellipsis:
            items = [convert(v, args[0], text=text) for v in value]
        elif len(args) != len(value):
            return _MISSING
        else:
            items = [convert(v, a, text=text) for v, a in zip(value, args, strict=True)]
        return _MISSING if any(i is _MISSING for i in items) else origin(items)
    if origin is dict:
        return value if isinstance(value, dict) else _MISSING
    if origin is typing.Literal:
        return value if value in typing.get_args(hint) else _MISSING
    return value  # a type this check does not know: the config's __post_init__ validates it


def value_fits(value: Any, hint: Any, *, text: bool = False) -> bool:
    """Whether ``value`` has the type ``hint`` (strict JSON types unless ``text``)."""
    return convert(value, hint, text=text) is not _MISSING


def describe(hint: Any) -> str:
    """What a type hint accepts, in words (``an integer``, ``null or a number``, ``a list of 3 numbers``)."""
    union = _union_args(hint)
    if union is not None:
        return " or ".join(describe(arg) for arg in sorted(union, key=lambda a: a is not type(None)))
    words = {type(None): "null", bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}
    if hint in words:
        return words[hint]
    origin = typing.get_origin(hint) or hint
    if origin in (tuple, list):
        args = typing.get_args(hint)
        if not args:
            return "a list"
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_plural(args[0])}"
        return f"a list of {len(args)} {_plural(args[0])}"
    if origin is dict:
        return "a JSON object"
    if origin is typing.Literal:
        return "one of " + ", ".join(show(a) for a in typing.get_args(hint))
    return getattr(hint, "__name__", str(hint))


def _plural(hint: Any) -> str:
    return {int: "integers", float: "numbers", str: "strings", bool: "booleans"}.get(hint, describe(hint))


def parse_text(text: str, hint: Any) -> Any:
    """A command-line value for a field of type ``hint``: text fields take it as it is (or a JSON string, quotes
    and all: ``"cpu"``), others as JSON.

    ``null`` is None where the field allows None; a value that is not JSON stays text, for the type check to
    refuse (or, for ``True``/``False``, to read as a boolean).
    """
    union = _union_args(hint) or (hint,)
    if text.strip() == "null" and type(None) in union:
        return None
    if str in union:
        return _json_string(text)
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _json_string(text: str) -> str:
    """``"cpu"`` (a JSON string literal, as scripts that JSON-encode every value write it) → ``cpu``; other text as
    it is."""
    if text.strip().startswith('"'):
        try:
            decoded = json.loads(text)
        except json.JSONDecodeError:
            return text
        if isinstance(decoded, str):
            return decoded
    return text


# ---------------------------------------------------------------------------------------------------- fields
@dataclass(frozen=True)
class Hparam:
    """One hyperparameter of a config class, as the CLI shows it.

    Attributes:
        name: The field name (``--set`` key; ``--grid-size`` for ``grid_size``).
        hint: Its type annotation.
        default: Its default value.
        help: The docstring's description (may be empty).
        inference: True when it still applies to a trained model (``--set`` with ``--run``).
    """

    name: str
    hint: Any
    default: Any
    help: str
    inference: bool

    @property
    def option(self) -> str:
        """The command-line option spelling (``--grid-size``)."""
        return "--" + self.name.replace("_", "-")


def hparams_of(config_class: type) -> list[Hparam]:
    """Every hyperparameter of a config dataclass, in field order."""
    hints = typing.get_type_hints(config_class)
    docs = attribute_docs(config_class)
    inference = set(getattr(config_class, "inference_keys", ()))
    found = []
    for field in dataclasses.fields(config_class):
        if not field.init:
            continue
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = None
        found.append(Hparam(field.name, hints[field.name], default, docs.get(field.name, ""), field.name in inference))
    return found


_ATTRIBUTE = re.compile(r"^(\s+)(\w+)(?: \([^)]*\))?:\s*(.*)$")


def attribute_docs(cls: type) -> dict[str, str]:
    """Field → description from the Google-style ``Attributes:`` sections of ``cls`` and its bases (a subclass's
    entry wins), whitespace collapsed."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        raw = klass.__dict__.get("__doc__")
        if not raw:
            continue
        lines = inspect.cleandoc(raw).splitlines()
        current: str | None = None
        indent = 0
        inside = False
        for line in lines:
            if line.strip() == "Attributes:":
                inside, current = True, None
                continue
            if not inside:
                continue
            if line.strip() and not line.startswith(" "):
                inside = False
                continue
            match = _ATTRIBUTE.match(line)
            if match and (current is None or len(match.group(1)) <= indent):
                indent, current = len(match.group(1)), match.group(2)
                docs[current] = match.group(3).strip()
            elif current is not None and line.strip():
                docs[current] = f"{docs[current]} {line.strip()}"
    return docs


# ---------------------------------------------------------------------------------------------------- checks
def _unknown(key: str, owner: str, valid: list[str]) -> HparamError:
    return HparamError(f"{key} is not a hyperparameter of {owner}; valid keys: {', '.join(valid)}", key=key)


def check_hparams(config_class: type, values: Mapping[str, Any], *, owner: str) -> dict[str, Any]:
    """``values`` with each value converted to its field's type (``"false"`` → False, ``3`` → 3.0 for a float).

    Raises:
        HparamError: for an unknown key (listing the valid ones) or a value of the wrong type.
    """
    fields = {h.name: h for h in hparams_of(config_class)}
    checked: dict[str, Any] = {}
    for key, value in values.items():
        if key not in fields:
            raise _unknown(key, owner, sorted(fields))
        converted = convert(value, fields[key].hint, text=True)
        if converted is _MISSING:
            raise HparamError.invalid(key, value, f"expected {describe(fields[key].hint)}", owner)
        checked[key] = converted
    return checked


def build_settings(config_class: type, values: Mapping[str, Any], *, owner: str) -> Any:
    """The config object of ``values``: types checked, then the config's own range checks.

    Raises:
        HparamError: one line naming the key, the value and what is allowed.
    """
    checked = check_hparams(config_class, values, owner=owner)
    try:
        return config_class(**checked)
    except HparamError as error:
        if error.key is None:
            raise
        raise HparamError.invalid(error.key, error.value, error.allowed, owner) from error
    except (TypeError, ValueError) as error:
        shown = ", ".join(f"{k}={show(v)}" for k, v in checked.items())
        given = f" ({shown})" if shown else ""
        raise HparamError(f"invalid {owner} hyperparameters{given}: {error}") from error


def check_overrides(config_class: type, values: Mapping[str, Any], *, owner: str) -> dict[str, Any]:
    """Hyperparameters given for an already trained model: only its ``inference_keys``, type- and range-checked.

    Raises:
        HparamError: for a key that cannot change a trained model (naming it and the keys that can), an unknown
            key or a wrong type.
    """
    checked = check_hparams(config_class, values, owner=owner)
    inference = sorted(h.name for h in hparams_of(config_class) if h.inference)
    for key, value in checked.items():
        if key not in inference:
            raise HparamError(
                f"{key}={show(value)} cannot change a trained {owner} model (it is fixed when the model is trained); "
                f"keys that apply at inference: {', '.join(inference)}",
                key=key,
                value=value,
            )
    build_settings(config_class, checked, owner=owner)  # the ranges (inference keys do not depend on others)
    return checked
