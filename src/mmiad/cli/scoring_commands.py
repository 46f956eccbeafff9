"""``mmiad test`` and ``mmiad predict``: metrics of a test split, and outputs for new samples, from a trained run,
an ONNX export (``predict``) or a zero-shot method; all score through the engine's one scoring loop."""

from __future__ import annotations

import argparse
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
    report_errors,
    split_list,
    write_json,
)
from mmiad.cli.options import describe_settings, hparams_from_args, rescoring, run_overrides
from mmiad.data.errors import DataError
from mmiad.methods.hparams import HparamError


def _test(args: argparse.Namespace) -> int:
    """``test --run RUN`` (a trained run) or ``test --method M`` (a zero-shot method: each test split one batch)."""
    from mmiad.engine import evaluate_run
    from mmiad.engine.zero_shot import evaluate_training_free, evaluate_zero_shot
    from mmiad.methods.registry import get_method

    if args.run is not None and args.method is not None:
        raise ValueError(f"--method {args.method} is zero-shot: it takes no --run")
    if args.run is None and args.method is None:
        raise ValueError("--run RUN is required (a trained run), or --method M for a zero-shot method (e.g. musc)")
    common: dict[str, Any] = {
        "categories": split_list(args.categories),
        "maps_dir": args.maps,
        "aupro_mode": args.aupro,
        "num_thresholds": args.num_thresholds,
        "cache_dir": args.cache_dir,
        "format": args.format,
        "strict": args.strict,
        "progress": True,
        "log": log,
    }
    if args.method is not None and get_method(args.method).training_free:
        result, errors = evaluate_training_free(args.data, _zero_shot_hparams(args), method=args.method, **common)
    elif args.method is not None:
        result, errors = evaluate_zero_shot(args.data, _zero_shot_hparams(args), method=args.method, **common)
    else:
        _refuse_precision(args)
        settings = _recorded(args)
        overrides = {**device_overrides(args), **({"compat": True} if args.compat else {}), **settings} or None
        result, errors = evaluate_run(args.run, args.data, overrides=overrides, **common)
        if settings:
            result = {**result, "inference_settings": settings}
    return show_metrics(result, errors, args.json)


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


def _refuse_precision(args: argparse.Namespace) -> None:
    """A trained run computes in the precision it was trained with (its features depend on it)."""
    if getattr(args, "precision", None):
        raise ValueError(
            "--precision applies to training and to zero-shot --method; a trained run uses the precision it was "
            "trained with (its model file records it)"
        )


def show_metrics(result: dict[str, Any], errors: list[DataError], json_path: str | None) -> int:
    """What ``test`` prints and writes: the skipped files, the table, and the JSON when asked for."""
    from mmiad.metrics import format_table

    report_errors(errors)
    print(format_table(result))
    degraded = {category: count for category, count in result.get("degraded", {}).items() if count}
    if degraded:
        counts = ", ".join(f"{category} {count}" for category, count in degraded.items())
        print(f"degraded samples (scored from one modality by the fallback, counted above): {counts}")
    if json_path:
        write_json(json_path, result)
    return 0


def _predict(args: argparse.Namespace) -> int:
    """``predict`` from a trained run (``--run``), an ONNX export (``--onnx``) or a zero-shot method
    (``--method``, the input is one batch labelled by the batch outlier rule); one writer for all three."""
    from mmiad.engine import RunModels, override_image_threshold

    if sum(x is not None for x in (args.run, args.onnx, args.method)) != 1:
        raise ValueError(
            "give exactly one of --run RUN (PyTorch), --onnx DIR (an `mmiad export` folder) or --method M "
            "(a zero-shot method, e.g. musc)"
        )
    if args.method is None:
        _refuse_precision(args)
    if args.onnx is not None and args.device not in (None, "auto", "cpu"):
        raise ValueError(
            "--onnx runs the exported graphs with ONNX Runtime on the CPU; use --run RUN for --device cuda"
        )
    errors: list[DataError] = []
    predictions: Iterable[Any]
    strict = args.strict
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
        records = _records(args, category, errors)
        predictions = predictor.predict(
            records, thresholds=thresholds, strict=strict, keep_rgb=True, progress=True, errors=errors
        )
    elif args.method is not None:
        from mmiad.engine.zero_shot import batch_thresholds, label_batch, score_zero_shot

        records = _records(args, args.category or "custom", errors)
        scored = score_zero_shot(
            records,
            _zero_shot_hparams(args),
            method=args.method,
            cache_dir=args.cache_dir,
            strict=strict,
            keep_rgb=True,
            progress=True,
            errors=errors,
        )
        if scored:
            batch = batch_thresholds(scored, args.outlier_k, args.threshold)
            label_batch(scored, batch)
            log(f"zero-shot batch thresholds: image {batch.image:.4g} ({batch.source})")
        predictions = scored
    else:
        settings = _recorded(args)
        overrides = {**device_overrides(args), **settings}
        models = RunModels(args.run, cache_dir=args.cache_dir, image_threshold=args.threshold, overrides=overrides)
        category = args.category or models.key_for(None)
        if rescoring(settings):
            _uncalibrated(models, category, args.threshold)
        records = _records(args, category, errors)
        predictions = models.predict(records, category, strict=strict, keep_rgb=True, progress=True, errors=errors)
    rows = write_prediction_outputs(predictions, Path(args.out), errors)
    if settings:
        write_json(Path(args.out) / "inference_settings.json", settings)
    report_errors(errors)
    if not rows:
        return EXIT_ERROR
    return EXIT_PARTIAL if errors else EXIT_OK


def _records(args: argparse.Namespace, category: str, errors: list[DataError]) -> list[Any]:
    """The records ``--input`` names; with ``--require-both``/``--strict`` an RGB without its cloud is an error
    instead of a sample to score from the RGB alone."""
    from mmiad.engine import input_records

    return input_records(
        args.input, xyz=args.xyz, category=category, format=args.format, require_both=args.strict, errors=errors
    )


def write_prediction_outputs(predictions: Iterable[Any], out: Path, errors: list[DataError]) -> list[Any]:
    """Maps, overlays, masks and the summary of ``predict``; a line for each degraded sample and a total.

    A sample whose outputs cannot be written is added to ``errors``; the others are still written.
    """
    from mmiad.postprocess.outputs import write_predictions

    def announce(row: Any) -> None:
        if row.degraded:
            log(f"  {row.name}: DEGRADED, {row.note}")

    rows, csv_path = write_predictions(predictions, out, on_row=announce, errors=errors)
    flagged = sum(1 for row in rows if row.label == 1)
    degraded = sum(1 for row in rows if row.degraded)
    also = f", {degraded} degraded (see the note column)" if degraded else ""
    log(f"{len(rows)} sample(s) scored, {flagged} flagged anomalous{also}; summary in {csv_path}")
    return rows


def _zero_shot_hparams(args: argparse.Namespace) -> dict[str, Any]:
    """Options of a zero-shot method: the extractor options plus ``--set KEY=VALUE``."""
    hparams: dict[str, Any] = {}
    for option in ("extractors", "weights_dir", "random_init", "device", "precision"):
        if getattr(args, option, None) not in (None, False):
            hparams[option] = getattr(args, option)
    return hparams_from_args(args, args.method, hparams)  # typed and checked against its config, as for training


def _add_zero_shot_options(parser: argparse.ArgumentParser) -> None:
    from mmiad.engine.zero_shot import training_free_methods, zero_shot_methods

    names, free = ", ".join(zero_shot_methods()), ", ".join(training_free_methods())
    parser.add_argument(
        "--method",
        help=f"a zero-shot method ({names}): no run needed, the batch scores itself; `test` also takes a "
        f"training-free one ({free}): its memory is built from --data's training split in the same command",
    )
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


def _add_strict_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--strict",
        "--require-both",
        dest="strict",
        action="store_true",
        help="a sample missing a modality (an absent, unreadable or empty cloud or RGB) is an error; by default it "
        "is scored from the other modality by the fallback, flagged degraded, and its file and reason are printed",
    )


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``test`` and ``predict`` to the top-level parser."""
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
    _add_strict_option(test)
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
    _add_strict_option(predict)
    predict.set_defaults(handler=_predict)
