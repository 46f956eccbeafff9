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
from mmiad.utils import atomic

# Exit statuses of every command (documented in the README's "Reliability" section).
EXIT_OK = 0  # done; for predict: every input was scored
EXIT_ERROR = 1  # a bad input file, model file or option: one line on stderr names it
EXIT_USAGE = 2  # the command line itself is wrong (argparse)
EXIT_PARTIAL = 3  # predict: some inputs could not be scored; every other one was scored and written
EXIT_INTERNAL = 4  # a bug in mmiad: one line, the traceback with --debug or MMIAD_DEBUG=1
EXIT_INTERRUPTED = 130  # Ctrl-C


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


def finite_float(text: str) -> float:
    """argparse ``type`` for thresholds and rates: ``nan`` or ``inf`` would silently label every sample good."""
    try:
        value = float(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from error
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


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
    return atomic.write_json(path, _json_safe(data), allow_nan=False)


def add_format_option(parser: argparse.ArgumentParser) -> None:
    """``--format``: the dataset layout, with the registered formats in its help."""
    from mmiad.data.formats import formats_help

    parser.add_argument("--format", default=None, help=formats_help())


def add_device_option(parser: argparse.ArgumentParser, *, precision: bool = False) -> None:
    """``--device`` (and with ``precision`` ``--precision``): where and in which arithmetic the work runs.

    Inference commands take only ``--device``: a model's precision is part of how its features were computed,
    so it comes from the model file.
    """
    from mmiad.utils.compute import PRECISIONS, check_device_name

    parser.add_argument(
        "--device",
        type=check_device_name,
        help="auto (default: CUDA when available), cpu, cuda or cuda:N; a model trained on a GPU runs on a CPU",
    )
    if precision:
        parser.add_argument(
            "--precision",
            choices=PRECISIONS,
            help="autocast for the extractors and the learned networks (default fp32, the papers'); bf16 is the "
            "fast low precision on recent CPUs; for training, import and zero-shot --method (a trained run keeps "
            "the precision it was trained with)",
        )


def device_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """``{"device": ...}`` when ``--device`` was given, for loading trained models (else their stored device, or
    ``auto`` when that device is not on this machine)."""
    return {"device": args.device} if getattr(args, "device", None) else {}


def parse_assignments(assignments: Sequence[str] | None) -> dict[str, Any]:
    """``--set KEY=VALUE`` options as hyperparameters: values parsed as JSON when they are JSON (numbers, booleans,
    lists, objects), else kept as strings; dashes in keys become underscores."""
    parsed: dict[str, Any] = {}
    for assignment in assignments or []:
        key, separator, value = assignment.partition("=")
        if not separator or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {assignment!r}")
        try:
            parsed[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            parsed[key.replace("-", "_")] = value
    return parsed
