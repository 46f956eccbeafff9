"""``python -m mmiad.bench compare``: every method with both extractor presets, in the form of the seeds' Tab. 5.

A small synthetic set (one category) keeps the deep presets affordable on a CPU: their weights are random, so
their metrics mean nothing, but their throughput and peak memory are what real weights would cost. Each run's
test is timed in a fresh process with an empty feature cache (``mmiad compare``), so throughput includes feature
extraction, as in deployment.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

from mmiad.bench.accuracy import UNIRCM
from mmiad.bench.common import machine_description, replace_section

#: Shorter training than the defaults for the methods that train for many epochs (the rest keep their defaults).
BENCH_HPARAMS: dict[str, dict[str, Any]] = {
    "cfm": {"epochs": 30},
    "unircm": {**UNIRCM},
    # GLFM is point-only: weight-free is FPFH with no 2D backbone (no Stage I then); one Stage I epoch when deep.
    "glfm": {"extractors": "none+fpfh", "adapt_epochs": 1},
}


def bench_methods() -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """Every registered method that trains → (weight-free hyperparameters, deep hyperparameters).

    The deep preset is the method's paper backbone (``paper_extractors`` on its config) with random weights; a new
    method is benchmarked with its defaults without being listed here.
    """
    from mmiad.methods.registry import available_methods, get_method

    methods: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
    for name in available_methods():
        method = get_method(name)
        if not method.needs_training:
            continue
        weightfree = dict(BENCH_HPARAMS.get(name, {}))
        paper = getattr(method.config_class, "paper_extractors", "dino-pointmae")
        methods[name] = (weightfree, {**weightfree, "extractors": paper, "random_init": True})
    return methods


def _compare_command(args: argparse.Namespace) -> int:
    from mmiad.compare import compare_runs, comparison_markdown
    from mmiad.data.synthetic import generate_dataset
    from mmiad.engine import train_run

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="mmiad-bench-"))
    data = work / "data"
    if not data.is_dir():
        generate_dataset(
            data,
            preset="demo",
            seed=args.seed,
            categories=[args.category],
            n_train=args.train,
            n_validation=2,
            n_test_good=2,
            n_per_defect=1,
        )
    runs = []
    for method, (weightfree, deep) in bench_methods().items():
        for preset, hparams in (("weightfree", weightfree), ("deep", deep)):
            if preset not in args.presets.split(","):
                continue
            run = work / f"{method}-{preset}"
            if not (run / "run.json").is_file():
                print(f"training {method} ({preset}) ...", file=sys.stderr, flush=True)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    train_run(method, data, run, hparams=hparams, cache_dir=str(work / "cache"), fallback=False)
            runs.append(run)
    rows = compare_runs(data, runs)
    body = (
        "### All methods, both extractor presets (the form of the seeds' Tab. 5)\n\n"
        f"Command: `python -m mmiad.bench compare` — synthetic `demo` category `{args.category}`, {args.train} "
        "nominal training images, 2+6 test images; `-weightfree` runs use the weight-free extractors, `-deep` runs "
        "DINO ViT-B/8 + Point-MAE (BTF: Wide-ResNet-50 + FPFH) **with random weights**, so their metrics are "
        "meaningless and only their speed and memory count. Throughput = test samples per second of a fresh "
        "process with an empty feature cache (feature extraction included); peak memory = that process's max "
        f"RSS.  \nMachine: {machine_description()}\n\n" + comparison_markdown(rows)
    )
    replace_section(Path(args.out), "compare", body)
    print(body)
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``compare`` to ``python -m mmiad.bench``."""
    parser = commands.add_parser("compare", help="all methods with both extractor presets: metrics, speed, memory")
    parser.add_argument("--out", default="BENCHMARKS.md")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--category", default="puck")
    parser.add_argument("--train", type=int, default=6)
    parser.add_argument("--presets", default="weightfree,deep")
    parser.add_argument("--work", help="keep runs and data here (default: a temporary folder)")
    parser.set_defaults(handler=_compare_command)
