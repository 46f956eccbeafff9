"""``mmiad export``: write a run's models as ONNX graphs plus a manifest, for deployment without PyTorch models."""

from __future__ import annotations

import argparse
import time

from mmiad.cli.common import log


def _export(args: argparse.Namespace) -> int:
    from mmiad.export import export_run

    started = time.perf_counter()
    folders = export_run(args.run, args.out, category=args.category, cache_dir=args.cache_dir)
    for key, folder in folders.items():
        log(f"[{key}] exported to {folder}")
    log(f"exported {len(folders)} model(s) in {time.perf_counter() - started:.1f} s → {args.out}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add the ``export`` sub-command to the top-level parser."""
    export = commands.add_parser("export", help="export a trained run to ONNX (needs pip install mmiad[onnx])")
    export.add_argument("--run", required=True, help="run folder written by train")
    export.add_argument("--out", required=True, help="folder to write the ONNX graphs and manifests to")
    export.add_argument("--category", help="export only the model serving this category")
    export.add_argument("--cache-dir", help="cache folder (preprocessing profile and extractor weights)")
    export.set_defaults(handler=_export)
