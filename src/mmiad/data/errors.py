"""Errors raised for bad input data.

Every reader turns low-level failures (truncated TIFF, wrong dtype, size mismatch) into a :class:`DataError`
that names the offending file and the problem, so a quality engineer sees *which* file to fix instead of a
traceback from deep inside numpy or Pillow.
"""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """A problem with one input file or sample.

    Attributes:
        path: The file (or folder) at fault, when known.
        problem: A short human-readable description of what is wrong.
    """

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = Path(path) if path is not None else None
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path is not None else problem)
