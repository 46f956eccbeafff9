"""Names read from files become parts of paths only after :func:`plain_name` has checked them.

Run indexes, export manifests and model files are data a user may have copied from anywhere. A model name
``../../x`` in ``run.json`` would otherwise make ``export`` write outside ``--out``, a category would place
preprocessed copies outside the cache, and ``train --resume`` would save a model wherever the index points.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath, PureWindowsPath

from mmiad.data.errors import DataError


class UnsafeNameError(DataError):
    """A name from a file is not a plain file or folder name (separator, ``..``, absolute, empty)."""


def plain_name(value: object, *, source: str | Path | None) -> str:
    """``value`` when it is a plain name usable as one path component, else an error naming ``source``.

    A plain name is a non-empty string without ``/`` or ``\\``, without NUL or other control characters, not
    ``.`` or ``..``, and not absolute or drive-relative on any platform (``C:x``).

    Raises:
        UnsafeNameError: naming ``source`` (the file the name was read from) and the name.
    """
    problem = None
    if not isinstance(value, str):
        problem = f"a name must be a string, got {type(value).__name__}"
    elif not value:
        problem = "an empty name"
    elif value in (".", ".."):
        problem = f"the name {value!r} refers to a folder, not a plain name"
    elif "/" in value or "\\" in value:
        problem = f"the name {value!r} contains a path separator"
    elif any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        problem = f"the name {value!r} contains a control character"
    elif PurePosixPath(value).is_absolute() or PureWindowsPath(value).drive or len(PureWindowsPath(value).parts) != 1:
        problem = f"the name {value!r} is not a plain name"
    if problem is not None:
        raise UnsafeNameError(source, f"{problem}; names from files must be plain file or folder names")
    return value  # type: ignore[return-value]
