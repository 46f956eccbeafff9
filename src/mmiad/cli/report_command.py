"""``mmiad report``: a self-contained HTML page to look at what a trained run gets right and wrong."""

from __future__ import annotations

import argparse
import time

from mmiad.cli.common import add_device_option, add_format_option, log, split_list


def _report(args: argparse.Namespace) -> int:
    from mmiad.report import ReportOptions, build_report

    started = time.perf_counter()
    options = ReportOptions(
        max_samples=args.max_samples,
        thumb_size=args.thumb_size,
        max_points=args.max_points,
        clouds=args.clouds,
        aupro_mode=args.aupro,
    )
    page = build_report(
        args.run,
        args.data,
        args.out,
        categories=split_list(args.categories),
        options=options,
        cache_dir=args.cache_dir,
        format=args.format,
        device=args.device,
        progress=True,
        log=log,
    )
    log(f"report written in {time.perf_counter() - started:.1f} s → {page}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add the ``report`` sub-command to the top-level parser."""
    report = commands.add_parser("report", help="self-contained HTML report of a run: metrics, curves, worst samples")
    report.add_argument("--run", required=True, help="run folder written by train")
    report.add_argument("--data", required=True, help="dataset root")
    add_format_option(report)
    report.add_argument("--out", required=True, help="folder to write index.html into")
    report.add_argument("--categories", help="comma-separated subset of categories")
    report.add_argument("--max-samples", type=int, default=12, help="gallery samples per category (default 12)")
    report.add_argument("--thumb-size", type=int, default=160, help="longest side of each picture (default 160)")
    report.add_argument("--max-points", type=int, default=20_000, help="points per 3D cloud (default 20000)")
    report.add_argument("--clouds", type=int, default=3, help="3D clouds per category, worst first (default 3)")
    report.add_argument("--aupro", default="exact", choices=["exact", "compat"], help="PRO curve (default exact)")
    report.add_argument("--cache-dir", help="cache folder")
    add_device_option(report)
    report.set_defaults(handler=_report)
