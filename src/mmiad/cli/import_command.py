"""``mmiad import``: the authors' released trained models (CFM, Uni-RCM, M3DM's UFF) as an mmiad run."""

from __future__ import annotations

import argparse
import time
from typing import Any

from mmiad.cli.common import add_device_option, add_format_option, log, report_errors, split_list
from mmiad.cli.options import add_hparam_options, hparams_from_args


def _hparams(args: argparse.Namespace) -> dict[str, Any]:
    """The hyperparameters beside the released weights, typed and checked against the method's config."""
    own = {k: getattr(args, k) for k in ("extractors", "weights_dir", "random_init", "compat", "device", "precision")}
    return hparams_from_args(args, args.method, {k: v for k, v in own.items() if v})


def importable_methods() -> list[str]:
    """The registered methods that declare ``importable`` (their package reads the official release)."""
    import mmiad.methods  # noqa: F401  (fills the registry)
    from mmiad.methods.registry import available_methods, get_method

    return [name for name in available_methods() if get_method(name).importable]


def _import(args: argparse.Namespace) -> int:
    from mmiad.engine.imports import import_run

    started = time.perf_counter()
    files, errors = import_run(
        args.method,
        args.source,
        args.out,
        orq=args.orq,
        data_root=args.data,
        format=args.format,
        categories=split_list(args.categories),
        max_fpr=args.max_fpr,
        hparams=_hparams(args),
        cache_dir=args.cache_dir,
        fallback=not args.no_fallback,
        progress=True,
        log=log,
    )
    report_errors(errors)
    thresholds = "calibrated on --data" if args.data else "none (no --data): predict gives scores without labels"
    seconds = time.perf_counter() - started
    log(f"imported {len(files)} model(s) in {seconds:.1f} s → {args.out}; thresholds: {thresholds}")
    return 0


def register(commands: argparse._SubParsersAction, *, method: str | None = None) -> None:
    """Add ``import`` to the top-level parser; ``--help`` describes ``method``'s hyperparameters."""
    parser = commands.add_parser(
        "import", help="turn the authors' released trained models into a run (test/predict/report/export it)"
    )
    parser.add_argument("--method", required=True, choices=importable_methods())
    parser.add_argument(
        "--from",
        dest="source",
        required=True,
        help="released file or folder: CFM per-class CFM_2Dto3D_/CFM_3Dto2D_ files; Uni-RCM UniRCM_*.pth "
        "(+ UniRCM_ORQ_*.pth); M3DM the UFF checkpoint of fusion_pretrain.py; G2SF the folder holding "
        "<class>/fusion/{MMScoringTrainerV2.pth,score_mean.npy,global_scale.npy}; GLFM pointmae_adapted.pth",
    )
    parser.add_argument("--orq", help="Uni-RCM: the ORQ file, when it is not inside --from")
    parser.add_argument("--out", required=True, help="run folder to create")
    parser.add_argument("--data", help="dataset root: calibrate thresholds as train does (required for m3dm and g2sf)")
    add_format_option(parser)
    parser.add_argument("--categories", help="comma-separated subset of categories")
    parser.add_argument("--max-fpr", type=float, default=0.01, help="false-alarm rate the thresholds allow")
    parser.add_argument("--cache-dir", help="cache folder (default $MMIAD_CACHE or ~/.cache/mmiad)")
    parser.add_argument("--no-fallback", action="store_true", help="skip the single-modality fallback models")
    parser.add_argument("--extractors", help="extractor preset the model was trained on (dino-pointmae; glfm for GLFM)")
    parser.add_argument("--weights-dir", help="folder with the backbone checkpoints (default $MMIAD_WEIGHTS_DIR)")
    parser.add_argument("--random-init", action="store_true", help="random extractor weights (smoke tests only)")
    parser.add_argument("--compat", action="store_true", help="the official code's scoring instead of the paper's")
    add_device_option(parser, precision=True)
    add_hparam_options(parser, method if method in importable_methods() else None, what="the imported model")
    parser.set_defaults(handler=_import)
