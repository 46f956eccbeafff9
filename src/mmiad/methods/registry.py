"""The method registry: what ``--method`` takes, filled by the method packages themselves.

This module imports no method. Each method class registers itself with :func:`register_method` when its package
is imported, and :mod:`mmiad.methods` imports the built-in packages, so importing anything under
``mmiad.methods`` makes every built-in method available. A new method is its own package plus one line in
``mmiad/methods/__init__.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from mmiad.utils.registry import Registry

if TYPE_CHECKING:
    from mmiad.methods.base import AnomalyModel

ModelT = TypeVar("ModelT", bound="type[AnomalyModel]")
_REGISTRY: Registry[type[AnomalyModel]] = Registry("method")


def register_method(name: str) -> Callable[[ModelT], ModelT]:
    """Class decorator adding a method to the registry under ``name`` (what ``--method`` takes)."""

    def decorate(cls: ModelT) -> ModelT:
        _REGISTRY.register(name, cls)
        cls.name = name
        return cls

    return decorate


def available_methods() -> list[str]:
    """Names accepted by ``--method``."""
    return _REGISTRY.names()


def get_method(name: str) -> type[AnomalyModel]:
    """The class registered under ``name``, with a clear error listing the known names."""
    return _REGISTRY.get(name)


def method_by_class_name(class_name: str) -> type[AnomalyModel] | None:
    """The registered class called ``class_name`` (``mmiad.CFM``), or None."""
    return next((cls for cls in _REGISTRY.values() if cls.__name__ == class_name), None)


def methods_help() -> str:
    """One line per method for ``--help``: its name and the first line of its docstring."""
    lines = []
    for name in available_methods():
        doc = (_REGISTRY[name].__doc__ or "").strip().splitlines()
        lines.append(f"{name}: {doc[0].rstrip('.') if doc else name}")
    return "; ".join(lines)
