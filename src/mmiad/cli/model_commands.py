"""Model sub-commands: ``train``, ``test``, ``predict`` and ``demo`` (the README's main job)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mmiad.cli.common import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_PARTIAL,
    add_device_option,
    add_format_option,
    device_overrides,
    finite_float,
    log,
    parse_assignments,
    report_errors,
    split_list,
    write_json,
)
from mmiad.cli.options import add_hparam_options, describe_settings, hparams_from_args, rescoring, run_overrides
from mmiad.data.errors import DataError
from mmiad.features.registry import extractors_help
from mmiad.methods.hparams import HparamError
from mmiad.methods.registry import methods_help
from mmiad.utils.atomic import write_text

# The command's own options that are also hyperparameters (every other one is generated from the method's config).
_OWN_HPARAM_OPTIONS = ("extractors", "weights_dir", "random_init", "compat", "device", "precision", "seed")


def _hparams(args: argparse.Namespace) -> dict[str, Any]:
    """The method's hyperparameters from the command line, typed and checked against its config."""
    own = {k: getattr(args, k) for k in _OWN_HPARAM_OPTIONS if getattr(args, k, None) not in (None, False)}
    return hparams_from_args(args, args.method, own)


def _train(args: argparse.Namespace) -> int:
    from mmiad.engine import extend_run, train_run
    from mmiad.engine.zero_shot import ZERO_SHOT_METHODS

    if args.method in ZERO_SHOT_METHODS:
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
    files, errors = train_run(
        args.method,
        args.data,
        args.out,
        categories=split_list(args.categories),
        unified=args.unified,
        shots=args.shots,
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


def _recorded(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--set``/``--weights-dir`` settings of ``--run`` that apply at inference (others are refused)."""
    settings = run_overrides(args)
    if settings:
        log(f"applied to the trained models at inference: {describe_settings(settings)}")
    return settings


def _uncalibrated(models: Any, category: str, threshold: float | None) -> None:
    """Settings that change the scores void the run's calibrated thresholds: labels only from ``--threshold``."""
    from mmiad.engine import override_image_threshold

    trained = models.trained(models.key_for(category))
    trained.thresholds = None if threshold is None else override_image_threshold(None, threshold)
    trained.fallback_thresholds = {}
    labels = "no labels (give --threshold for them)" if threshold is None else f"labels from --threshold {threshold}"
    log(f"the run's thresholds were calibrated without these settings: scores and maps only, {labels}")


def _test(args: argparse.Namespace) -> int:
    from mmiad.engine import evaluate_run

    if args.method is not None:
        return _test_zero_shot(args)
    if args.run is None:
        raise ValueError("--run RUN is required (or --method musc to score each test split zero-shot)")
    _refuse_precision(args)
    settings = _recorded(args)
    result, errors = evaluate_run(
        args.run,
        args.data,
        categories=split_list(args.categories),
        maps_dir=args.maps,
        aupro_mode=args.aupro,
        num_thresholds=args.num_thresholds,
        cache_dir=args.cache_dir,
        format=args.format,
        overrides={**device_overrides(args), **({"compat": True} if args.compat else {}), **settings} or None,
        progress=True,
        log=log,
    )
    if settings:
        result = {**result, "inference_settings": settings}
    return _show_metrics(result, errors, args.json)


def _refuse_precision(args: argparse.Namespace) -> None:
    """A trained run computes in the precision it was trained with (its features depend on it)."""
    if getattr(args, "precision", None):
        raise ValueError(
            "--precision applies to training and to zero-shot --method; a trained run uses the precision it was "
            "trained with (its model file records it)"
        )


def _show_metrics(result: dict[str, Any], errors: list[DataError], json_path: str | None) -> int:
    """What ``test`` prints and writes: the skipped files, the table, and the JSON when asked for."""
    from mmiad.metrics import format_table

    report_errors(errors)
    print(format_table(result))
    if json_path:
        write_json(json_path, result)
    return 0


def _predict(args: argparse.Namespace) -> int:
    from mmiad.engine import RunModels, apply_thresholds, input_records, override_image_threshold

    if args.method is not None:
        return _predict_zero_shot(args)
    if (args.run is None) == (args.onnx is None):
        raise ValueError("give exactly one of --run RUN (PyTorch) or --onnx DIR (an `mmiad export` folder)")
    _refuse_precision(args)
    if args.onnx is not None and args.device not in (None, "auto", "cpu"):
        raise ValueError(
            "--onnx runs the exported graphs with ONNX Runtime on the CPU; use --run RUN for --device cuda"
        )
    errors: list[DataError] = []
    predictions: Iterable[Any]
    settings: dict[str, Any] = {}
    if args.onnx is not None:
        if args.set or args.extractors or args.weights_dir or args.random_init:
            raise HparamError(
                "--set, --extractors, --weights-dir and --random-init do not apply to --onnx: the "
                "exported graphs are fixed (export again from a run)"
            )
        from mmiad.export.runtime import OnnxPredictor

        predictor = OnnxPredictor.from_export(args.onnx, args.category, cache_dir=args.cache_dir)
        category = args.category or predictor.manifest.model_config.get("category", "custom")
        thresholds = predictor.thresholds
        if args.threshold is not None:
            thresholds = override_image_threshold(thresholds, args.threshold)
        records = input_records(args.input, xyz=args.xyz, category=category, format=args.format, errors=errors)
        predictions = (
            apply_thresholds(p, thresholds) for p in predictor.predict(records, progress=True, errors=errors)
        )
    else:
        settings = _recorded(args)
        overrides = {**device_overrides(args), **settings}
        models = RunModels(args.run, cache_dir=args.cache_dir, image_threshold=args.threshold, overrides=overrides)
        category = args.category or models.key_for(None)
        if rescoring(settings):
            _uncalibrated(models, category, args.threshold)
        records = input_records(args.input, xyz=args.xyz, category=category, format=args.format, errors=errors)
        predictions = models.predict(records, category, progress=True, errors=errors)
    rows = _write_predictions(predictions, Path(args.out), errors)
    if settings:
        write_json(Path(args.out) / "inference_settings.json", settings)
    report_errors(errors)
    if not rows:
        return EXIT_ERROR
    return EXIT_PARTIAL if errors else EXIT_OK


def _write_predictions(predictions: Iterable[Any], out: Path, errors: list[DataError]) -> list[Any]:
    """Maps, overlays, masks and the summary of ``predict``; a line for each degraded sample and a total.

    A sample whose outputs cannot be written is added to ``errors``; the others are still written.
    """
    from mmiad.postprocess.outputs import write_predictions

    def announce(row: Any) -> None:
        if row.degraded:
            log(f"  {row.name}: DEGRADED, scored from {row.modality} only (a sensor dropped out)")

    rows, csv_path = write_predictions(predictions, out, on_row=announce, errors=errors)
    flagged = sum(1 for row in rows if row.label == 1)
    log(f"{len(rows)} sample(s) scored, {flagged} flagged anomalous; summary in {csv_path}")
    return rows


def _zero_shot_hparams(args: argparse.Namespace) -> dict[str, Any]:
    """Options of a zero-shot method: the extractor options plus ``--set KEY=VALUE``."""
    from mmiad.methods.registry import available_methods

    hparams: dict[str, Any] = {}
    for option in ("extractors", "weights_dir", "random_init", "device", "precision"):
        if getattr(args, option, None) not in (None, False):
            hparams[option] = getattr(args, option)
    if args.method in available_methods():  # typed and checked against its config, as for training
        return hparams_from_args(args, args.method, hparams)
    hparams.update(parse_assignments(args.set))
    return hparams


def _test_zero_shot(args: argparse.Namespace) -> int:
    """``test --method musc``: each category's test split is one batch scored by mutual scoring."""
    from mmiad.engine.zero_shot import evaluate_zero_shot

    if args.run is not None:
        raise ValueError(f"--method {args.method} is zero-shot: it takes no --run")
    result, errors = evaluate_zero_shot(
        args.data,
        _zero_shot_hparams(args),
        method=args.method,
        categories=split_list(args.categories),
        maps_dir=args.maps,
        aupro_mode=args.aupro,
        num_thresholds=args.num_thresholds,
        cache_dir=args.cache_dir,
        format=args.format,
        progress=True,
        log=log,
    )
    return _show_metrics(result, errors, args.json)


def _predict_zero_shot(args: argparse.Namespace) -> int:
    """``predict --method musc``: the input folder is one batch; labels by the batch outlier rule."""
    from mmiad.engine import input_records
    from mmiad.engine.zero_shot import batch_thresholds, label_batch, score_zero_shot

    if args.run is not None or args.onnx is not None:
        raise ValueError(f"--method {args.method} is zero-shot: it takes no --run or --onnx")
    errors: list[DataError] = []
    category = args.category or "custom"
    records = input_records(args.input, xyz=args.xyz, category=category, format=args.format, errors=errors)
    predictions = score_zero_shot(
        records, _zero_shot_hparams(args), method=args.method, cache_dir=args.cache_dir, progress=True, errors=errors
    )
    thresholds = batch_thresholds(predictions, args.outlier_k, args.threshold)
    label_batch(predictions, thresholds)
    log(f"zero-shot batch thresholds: image {thresholds.image:.4g} ({thresholds.source})")
    rows = _write_predictions(predictions, Path(args.out), errors)
    report_errors(errors)
    if not rows:
        return EXIT_ERROR
    return EXIT_PARTIAL if errors else EXIT_OK


def _add_zero_shot_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", help="musc: zero-shot MuSc-V2, no run needed (the batch scores itself)")
    parser.add_argument(
        "--extractors", help="zero-shot --method only: extractor preset (a --run keeps its own; refused there)"
    )
    parser.add_argument(
        "--weights-dir", help="folder with checkpoint files (zero-shot, or where a --run's weights are on this machine)"
    )
    parser.add_argument(
        "--random-init", action="store_true", help="zero-shot --method only: random extractor weights (smoke only)"
    )
    parser.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="with --method: a zero-shot hyperparameter (e.g. r_list=[1]); with --run: a setting that applies to "
        "a trained model at inference (e.g. aggregation=sum for CFM; `mmiad train --method M --help` lists M's "
        "hyperparameters), applied and recorded in the output; any other key is refused",
    )


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
    _show_metrics(result, errors + test_errors, str(out / "metrics.json"))
    log("4/4 predicting one defect folder per category (maps, overlays, masks, summary)")
    models = RunModels(run, cache_dir=cache)
    for category in sorted(p.name for p in data.iterdir() if p.is_dir()):
        folders = sorted(p for p in (data / category / "test").iterdir() if p.is_dir() and p.name != "good")
        records = input_records(folders[0], category=category)
        predict_errors: list[DataError] = []
        predictions = models.predict(records, category, progress=True, errors=predict_errors)
        _write_predictions(predictions, out / "predictions" / category, predict_errors)
        report_errors(predict_errors)
    log(f"done: metrics in {out / 'metrics.json'}, maps in {out / 'maps'}, predictions in {out / 'predictions'}")
    return 0


def _add_training_options(parser: argparse.ArgumentParser, method: str | None) -> None:
    """The pipeline options every method shares, then the method's own hyperparameters (from its config)."""
    parser.add_argument("--extractors", help=f"default weightfree; {extractors_help()}")
    parser.add_argument("--weights-dir", help="folder with checkpoint files (default $MMIAD_WEIGHTS_DIR)")
    parser.add_argument("--compat", action="store_true", help="the official code's behaviour instead of the paper's")
    parser.add_argument("--random-init", action="store_true", help="random extractor weights (smoke tests only)")
    add_device_option(parser, precision=True)
    add_hparam_options(parser, method, what="training")


def register(commands: argparse._SubParsersAction, *, method: str | None = None) -> None:
    """Add the model sub-commands to the top-level parser; ``train --help`` describes ``method``'s options."""
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
    train.add_argument("--shots", type=int, help="few-shot: k nominal samples per category, drawn with --seed")
    train.add_argument("--seed", type=int, help="seed of the few-shot draw and of training")
    train.add_argument("--max-fpr", type=finite_float, default=0.01, help="false-alarm rate the thresholds allow")
    train.add_argument("--cache-dir", help="cache folder (default $MMIAD_CACHE or ~/.cache/mmiad)")
    train.add_argument(
        "--no-fallback", action="store_true", help="skip the single-modality models used when a sensor drops out"
    )
    _add_training_options(train, method or "cfm")
    train.set_defaults(handler=_train)

    test = commands.add_parser("test", help="metrics per category of a trained run on the test split")
    test.add_argument("--run", help="run folder written by train (not with a zero-shot --method)")
    test.add_argument("--data", required=True, help="dataset root (its test split is scored; Eyecandies: test_public)")
    add_format_option(test)
    test.add_argument("--json", help="write the metrics as JSON here")
    test.add_argument("--maps", help="also write maps at the original resolution here (for `mmiad evaluate`)")
    test.add_argument("--categories", help="comma-separated subset of categories")
    test.add_argument(
        "--compat",
        action="store_true",
        help="score the official way (as a run trained with --compat) and use the papers' sampled AUPRO",
    )
    test.add_argument(
        "--aupro",
        choices=["exact", "compat"],
        help="AUPRO curve (default: compat for compat runs, exact otherwise)",
    )
    test.add_argument(
        "--num-thresholds",
        type=int,
        help="thresholds of the compat AUPRO (default: the method's; 99 CFM/Uni-RCM, 100 M3DM/BTF)",
    )
    test.add_argument("--cache-dir", help="cache folder")
    add_device_option(test, precision=True)
    _add_zero_shot_options(test)
    test.set_defaults(handler=_test)

    predict = commands.add_parser("predict", help="score new samples: maps, overlays, masks, summary")
    predict.add_argument("--run", help="run folder written by train")
    predict.add_argument("--onnx", help="an `mmiad export` folder: run the exported ONNX graphs instead of PyTorch")
    predict.add_argument(
        "--input",
        required=True,
        help="folder with rgb/ + xyz/, a flat folder of pairs, an RGB (with --xyz), or a dataset root (--category's "
        "test split)",
    )
    add_format_option(predict)
    predict.add_argument("--xyz", help="the xyz TIFF when --input is a single RGB file")
    predict.add_argument("--out", required=True, help="output folder")
    predict.add_argument("--category", help="which category's model to use (needed when the run has several)")
    predict.add_argument("--threshold", type=finite_float, help="override the calibrated image threshold")
    predict.add_argument("--cache-dir", help="cache folder")
    predict.add_argument(
        "--outlier-k", type=float, default=3.0, help="zero-shot labels: anomalous above median + k·1.4826·MAD"
    )
    add_device_option(predict, precision=True)
    _add_zero_shot_options(predict)
    predict.set_defaults(handler=_predict)

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
