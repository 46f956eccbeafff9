"""``mmiad train``: one model per category (or a unified one) from a dataset's nominal samples."""

from __future__ import annotations

import argparse
import time
from typing import Any

from mmiad.cli.common import (
    add_device_option,
    add_format_option,
    finite_float,
    log,
    parse_assignments,
    report_errors,
    split_list,
)
from mmiad.features.registry import extractors_help
from mmiad.methods.registry import methods_help

# CLI option → method hyperparameter; only options the user actually gave are passed on.
_HPARAM_OPTIONS = {
    "extractors": "extractors",
    "weights_dir": "weights_dir",
    "epochs": "epochs",
    "batch_size": "batch_size",
    "lr": "learning_rate",
    "image_size": "image_size",
    "grid_size": "grid_size",
    "aggregation": "aggregation",
    "mapping": "mapping",
    "smoothing": "smoothing",
    "modality": "modality",
    "random_init": "random_init",
    "compat": "compat",
    "memory_budget_gb": "memory_budget_gb",
    "device": "device",
    "precision": "precision",
}


def _hparams(args: argparse.Namespace) -> dict[str, Any]:
    hparams = {key: getattr(args, option) for option, key in _HPARAM_OPTIONS.items()}
    hparams = {k: v for k, v in hparams.items() if v not in (None, False)}
    if args.seed is not None:
        hparams["seed"] = args.seed
    hparams.update(parse_assignments(args.set))
    return hparams


def _train(args: argparse.Namespace) -> int:
    from mmiad.engine import extend_run, train_run
    from mmiad.methods.registry import get_method

    if not get_method(args.method).needs_training:
        raise ValueError(
            f"{args.method} is zero-shot and needs no training: score a batch directly with "
            f"`mmiad test --method {args.method} --data ROOT` or "
            f"`mmiad predict --method {args.method} --input DIR --out OUT`"
        )
    started = time.perf_counter()
    if args.resume or args.add_categories:
        if not (args.resume and args.add_categories):
            raise ValueError("--resume RUN and --add-categories a,b go together")
        path, errors = extend_run(
            args.resume,
            args.data,
            split_list(args.add_categories) or [],
            epochs=args.epochs or 20,
            max_fpr=args.max_fpr,
            cache_dir=args.cache_dir,
            format=args.format,
            progress=True,
            log=log,
        )
        report_errors(errors)
        log(f"extended {path} in {time.perf_counter() - started:.1f} s")
        return 0
    if not args.out:
        raise ValueError("--out RUN is required (or --resume RUN --add-categories ...)")
    if args.shot_selection and not args.shots:
        raise ValueError("--shot-selection applies to few-shot training: give --shots K too")
    files, errors = train_run(
        args.method,
        args.data,
        args.out,
        categories=split_list(args.categories),
        unified=args.unified,
        shots=args.shots,
        shot_selection=args.shot_selection or "random",
        seed=args.seed if args.seed is not None else 0,
        max_fpr=args.max_fpr,
        hparams=_hparams(args),
        fallback=not args.no_fallback,
        cache_dir=args.cache_dir,
        format=args.format,
        progress=True,
        log=log,
    )
    report_errors(errors)
    log(f"trained {len(files)} model(s) in {time.perf_counter() - started:.1f} s → {args.out}")
    return 0


def _add_training_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--extractors", help=f"default weightfree; {extractors_help()}")
    parser.add_argument("--weights-dir", help="folder with checkpoint files (default $MMIAD_WEIGHTS_DIR)")
    parser.add_argument("--epochs", type=int, help="training epochs (paper: 250)")
    parser.add_argument("--batch-size", type=int, help="images per optimisation step (official: 4)")
    parser.add_argument(
        "--memory-budget-gb",
        type=float,
        help="memory training may use (default: 80%% of the available RAM, or GPU memory on CUDA); a batch that "
        "does not fit is split into micro-batches with accumulated gradients",
    )
    parser.add_argument("--lr", type=float, help="learning rate")
    parser.add_argument("--image-size", type=int, help="model input side (default 224)")
    parser.add_argument("--grid-size", type=int, help="side of the grid the mapping runs on (default 224)")
    parser.add_argument("--aggregation", choices=["product", "sum", "max", "2d", "3d"], help="map aggregation")
    parser.add_argument("--mapping", choices=["crossmodal", "intramodal"], help="crossmodal (CFM) or ablation")
    parser.add_argument("--smoothing", choices=["gaussian", "box_cascade", "pil_uint8", "none"])
    parser.add_argument("--modality", choices=["both", "rgb", "xyz"], help="cmdr: 2D+3D (default), 2D only or 3D only")
    parser.add_argument("--compat", action="store_true", help="the official code's behaviour instead of the paper's")
    parser.add_argument("--random-init", action="store_true", help="random extractor weights (smoke tests only)")
    add_device_option(parser, precision=True)
    parser.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="any other hyperparameter of the method, e.g. --set hidden=128 --set use_orq=false (JSON values)",
    )


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``train`` to the top-level parser."""
    train = commands.add_parser("train", help="train one model per category on nominal samples")
    train.add_argument(
        "--method", default="cfm", help=f"default cfm; {methods_help()} (musc is zero-shot: no training)"
    )
    train.add_argument("--data", required=True, help="dataset root (MVTec 3D-AD, Eyecandies, ...)")
    add_format_option(train)
    train.add_argument("--out", help="run folder to write")
    train.add_argument("--resume", help="a trained unified run to extend (with --add-categories)")
    train.add_argument("--add-categories", help="comma-separated new categories to add to --resume RUN")
    train.add_argument("--categories", help="comma-separated subset of categories")
    train.add_argument("--unified", action="store_true", help="one model for all categories (no category labels)")
    train.add_argument(
        "--shots", type=int, help="few-shot: K nominal samples per category (the same files for every method)"
    )
    train.add_argument(
        "--shot-selection",
        choices=["random", "first"],
        help="few-shot: random (seeded by --seed, default) or first (the first K files in sorted order, CIF's)",
    )
    train.add_argument("--seed", type=int, help="seed of the few-shot draw and of training")
    train.add_argument("--max-fpr", type=finite_float, default=0.01, help="false-alarm rate the thresholds allow")
    train.add_argument("--cache-dir", help="cache folder (default $MMIAD_CACHE or ~/.cache/mmiad)")
    train.add_argument(
        "--no-fallback", action="store_true", help="skip the single-modality models used when a sensor drops out"
    )
    _add_training_options(train)
    train.set_defaults(handler=_train)
