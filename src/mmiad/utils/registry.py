"""One registry shape for everything a user picks by name: methods, dataset formats, extractors.

timm's and anomalib's registries are the model: a name maps to one entry, registering a second entry under a
taken name is refused (two packages silently shadowing each other is a bug nobody would find), and looking up an
unknown name fails with a message that lists every name that would have worked. Each area keeps its own thin
functions (``register_method``, ``get_format``...) on top of a :class:`Registry`, so its callers do not change.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

EntryT = TypeVar("EntryT")


class RegistryError(ValueError):
    """A duplicate registration, an invalid name, or a lookup of a name nobody registered."""


class Registry(Mapping[str, EntryT], Generic[EntryT]):
    """Entries by name, refusing duplicates; a read-only mapping for everything else.

    Args:
        kind: What an entry is, for messages (``method``, ``dataset format``, ``image extractor``).
        identity: What makes two registrations "the same entry": registering the same entry again (a module
            imported twice) is allowed, another one under a taken name is not. Default: the entry itself.
        valid_name: Names this registry accepts (e.g. extractor names must not contain ``+``); default: non-empty.
        order: Sort key of :meth:`names` (and of the error listing them), from the name and the entry; default:
            the name (dataset formats list the most specific first, the order detection tries them in).
    """

    def __init__(
        self,
        kind: str,
        *,
        identity: Callable[[EntryT], object] | None = None,
        valid_name: Callable[[str], bool] | None = None,
        order: Callable[[str, EntryT], Any] | None = None,
    ) -> None:
        self.kind = kind
        self._identity = identity or (lambda entry: entry)
        self._valid_name = valid_name or bool
        self._order = order
        self._entries: dict[str, EntryT] = {}

    def register(self, name: str, entry: EntryT) -> EntryT:
        """Add ``entry`` under ``name`` and return it.

        Raises:
            RegistryError: for an invalid name, or a name another entry already holds.
        """
        if not isinstance(name, str) or not self._valid_name(name):
            raise RegistryError(f"invalid {self.kind} name {name!r}")
        if name in self._entries and self._identity(self._entries[name]) is not self._identity(entry):
            raise RegistryError(
                f"{self.kind} name {name!r} is already registered (by {_describe(self._entries[name])}); "
                "choose another name"
            )
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> EntryT:  # type: ignore[override]  # a lookup that explains itself, not Mapping.get
        """The entry called ``name``.

        Raises:
            RegistryError: naming ``name`` and listing the registered names.
        """
        if name not in self._entries:
            known = ", ".join(self.names()) or "none registered"
            raise RegistryError(f"unknown {self.kind} {name!r}; available: {known}")
        return self._entries[name]

    def names(self) -> list[str]:
        """Registered names, sorted (by ``order`` when given)."""
        if self._order is None:
            return sorted(self._entries)
        order = self._order
        return sorted(self._entries, key=lambda name: order(name, self._entries[name]))

    def pop(self, name: str, default: EntryT | None = None) -> EntryT | None:
        """Remove and return an entry, or ``default`` (tests that register a toy entry remove it again)."""
        return self._entries.pop(name, default)

    def __getitem__(self, name: str) -> EntryT:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


def _describe(entry: object) -> str:
    """A short name for an entry in messages: its name (a factory's for extractors), else its type's."""
    owner = getattr(entry, "factory", entry)
    return str(getattr(owner, "__name__", None) or type(owner).__name__)
