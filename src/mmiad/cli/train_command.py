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
    report_errors,
    split_list,
)
from mmiad.cli.options import add_hparam_options, hparams_from_args, method_config
from mmiad.features.registry import extractors_help
from mmiad.methods.hparams import HparamError
from mmiad.methods.registry import methods_help

# The command's own options that are also hyperparameters (every other one is generated from the method's config).
_OWN_HPARAM_OPTIONS = ("extractors", "weights_dir", "random_init", "compat", "device", "precision", "seed")


def _hparams(args: argparse.Namespace) -> dict[str, Any]:
    """The method's hyperparameters from the command line, typed and checked against its config."""
    own = {k: getattr(args, k) for k in _OWN_HPARAM_OPTIONS if getattr(args, k, None) not in (None, False)}
    return hparams_from_args(args, args.method, own)


def _train(args: argparse.Namespace) -> int:
    from mmiad.engine import extend_run, train_run
    from mmiad.methods.registry import get_method

    method_config(args.method)  # an unknown method is a usage error (exit 2) listing the known ones
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
            epochs=_extend_epochs(args),
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


def _extend_epochs(args: argparse.Namespace) -> int:
    """``--epochs`` of ``--resume RUN --add-categories``, the one hyperparameter extending a run takes."""
    from mmiad.engine.runs import read_run_index

    given = hparams_from_args(args, str(read_run_index(args.resume).get("method")), {})
    if set(given) - {"epochs"}:
        raise HparamError(
            f"--resume RUN --add-categories keeps the run's hyperparameters; only --epochs applies, not "
            f"{', '.join(sorted(set(given) - {'epochs'}))}"
        )
    return int(given.get("epochs", 20))


def _add_training_options(parser: argparse.ArgumentParser, method: str | None) -> None:
    """The pipeline options every method shares, then the method's own hyperparameters (from its config)."""
    parser.add_argument("--extractors", help=f"default weightfree; {extractors_help()}")
    parser.add_argument("--weights-dir", help="folder with checkpoint files (default $MMIAD_WEIGHTS_DIR)")
    parser.add_argument("--compat", action="store_true", help="the official code's behaviour instead of the paper's")
    parser.add_argument("--random-init", action="store_true", help="random extractor weights (smoke tests only)")
    add_device_option(parser, precision=True)
    add_hparam_options(parser, method, what="training")


def register(commands: argparse._SubParsersAction, *, method: str | None = None) -> None:
    """Add ``train`` to the top-level parser; ``train --help`` describes ``method``'s options."""
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
    _add_training_options(train, method or "cfm")
    train.set_defaults(handler=_train)
