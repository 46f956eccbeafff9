"""Helpers shared by the CLI commands: reporting skipped files, writing JSON, parsing lists."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmiad.data.errors import DataError


def log(message: str) -> None:
    """Progress messages go to stderr so stdout stays clean for tables and JSON."""
    print(message, file=sys.stderr, flush=True)


def report_errors(errors: Sequence[DataError], what: str = "skipped") -> None:
    """List the bad files that were skipped, so nothing is lost silently."""
    if not errors:
        return
    log(f"{len(errors)} file(s) {what}:")
    for error in errors:
        log(f"  - {error}")


def split_list(value: str | None) -> list[str] | None:
    """``a,b`` → ``["a", "b"]``; None stays None."""
    if value is None:
        return None
    items = [item.strip() for item in value.split(",") if item.strip()]
    return items or None


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def write_json(path: str | Path, data: Any) -> Path:
    """Strict JSON (NaN becomes null), creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_safe(data), indent=2, allow_nan=False))
    return path


def add_format_option(parser: argparse.ArgumentParser) -> None:
    """``--format``: the dataset layout, with the registered formats in its help."""
    from mmiad.data.formats import formats_help

    parser.add_argument("--format", default=None, help=formats_help())
