"""Model sub-commands: ``train`` (:mod:`~mmiad.cli.train_command`), ``test`` and ``predict``
(:mod:`~mmiad.cli.scoring_commands`), ``compare`` and ``demo`` (the README's main job)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from mmiad.cli import scoring_commands, train_command
from mmiad.cli.common import add_device_option, add_format_option, log, report_errors, write_json
from mmiad.cli.scoring_commands import show_metrics, write_prediction_outputs
from mmiad.data.errors import DataError
from mmiad.utils.atomic import write_text


def _compare(args: argparse.Namespace) -> int:
    from mmiad.compare import compare_runs, comparison_markdown

    rows = compare_runs(args.data, args.runs, cache_dir=args.cache_dir, format=args.format, device=args.device)
    markdown = comparison_markdown(rows)
    print(markdown)
    if args.markdown:
        write_text(args.markdown, markdown + "\n")
    if args.json:
        write_json(args.json, rows)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from mmiad.data.synthetic import generate_dataset
    from mmiad.engine import RunModels, evaluate_run, input_records, train_run

    out = Path(args.out)
    data, run, cache = out / "data", out / "run", str(out / "cache")
    log(f"1/4 synthetic dataset (preset demo, seed {args.seed}) → {data}")
    generate_dataset(data, preset="demo", seed=args.seed, overwrite=True, progress=True)
    log("2/4 training CFM with the weight-free extractors")
    started = time.perf_counter()
    hparams = {"extractors": "weightfree", "epochs": args.epochs}
    _, errors = train_run("cfm", data, run, hparams=hparams, cache_dir=cache, progress=True, log=log)
    log(f"    trained in {time.perf_counter() - started:.1f} s")
    log("3/4 testing")
    result, test_errors = evaluate_run(run, data, maps_dir=out / "maps", cache_dir=cache, progress=True, log=log)
    show_metrics(result, errors + test_errors, str(out / "metrics.json"))
    log("4/4 predicting one defect folder per category (maps, overlays, masks, summary)")
    models = RunModels(run, cache_dir=cache)
    for category in sorted(p.name for p in data.iterdir() if p.is_dir()):
        folders = sorted(p for p in (data / category / "test").iterdir() if p.is_dir() and p.name != "good")
        records = input_records(folders[0], category=category)
        predict_errors: list[DataError] = []
        predictions = models.predict(records, category, keep_rgb=True, progress=True, errors=predict_errors)
        write_prediction_outputs(predictions, out / "predictions" / category, predict_errors)
        report_errors(predict_errors)
    log(f"done: metrics in {out / 'metrics.json'}, maps in {out / 'maps'}, predictions in {out / 'predictions'}")
    return 0


def register(commands: argparse._SubParsersAction, *, method: str | None = None) -> None:
    """Add the model sub-commands to the top-level parser (in the order ``--help`` lists them)."""
    train_command.register(commands, method=method)
    scoring_commands.register(commands)
    compare = commands.add_parser("compare", help="one table comparing trained runs: metrics, speed, memory")
    compare.add_argument("--data", required=True, help="dataset root")
    add_format_option(compare)
    compare.add_argument("--runs", required=True, nargs="+", help="run folders to compare")
    compare.add_argument("--markdown", help="write the tables as markdown here")
    compare.add_argument("--json", help="write the rows as JSON here")
    compare.add_argument(
        "--cache-dir", help="shared feature cache (default: a fresh one per run, so timings include feature extraction)"
    )
    add_device_option(compare)
    compare.set_defaults(handler=_compare)

    demo = commands.add_parser("demo", help="the main job: synthetic data → train CFM → test → predict")
    demo.add_argument("--out", default="demo_out", help="output folder")
    demo.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    demo.add_argument("--epochs", type=int, default=60, help="CFM training epochs")
    demo.set_defaults(handler=_demo)
