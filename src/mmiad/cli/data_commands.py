"""Data sub-commands: ``synth``, ``preprocess``, ``evaluate`` and ``cache``."""

from __future__ import annotations

import argparse
from pathlib import Path

from mmiad.cli.common import add_format_option, log, report_errors, split_list, write_json
from mmiad.data.errors import DataError


def _synth(args: argparse.Namespace) -> int:
    from mmiad.data.synthetic import generate_dataset

    root = generate_dataset(
        args.out,
        preset=args.preset,
        seed=args.seed,
        categories=split_list(args.categories),
        image_size=args.image_size,
        layout=args.format,
        overwrite=args.overwrite,
        progress=True,
    )
    log(f"wrote the {args.preset} synthetic dataset (seed {args.seed}, {args.format} layout) to {root}")
    return 0


def _preprocess(args: argparse.Namespace) -> int:
    from mmiad.data.formats import SPLITS, open_dataset
    from mmiad.data.preprocess import get_profile, preprocess_dataset
    from mmiad.features.registry import default_cache_dir

    profile = get_profile(args.profile)
    dataset = open_dataset(args.data, args.format)
    errors: list[DataError] = []
    records = []
    for category in split_list(args.categories) or dataset.categories():
        for split in SPLITS:
            records += dataset.records(category, split, errors=errors)
    cache_root = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    prepared, bad = preprocess_dataset(records, profile, cache_root, progress=True)
    report_errors(errors + bad)
    log(f"{len(prepared)} samples preprocessed with profile {profile.name!r} under {cache_root}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from mmiad.metrics import evaluate_maps_dir, format_table

    result, errors = evaluate_maps_dir(
        args.data,
        args.maps,
        categories=split_list(args.categories),
        aupro_mode=args.aupro,
        num_thresholds=args.num_thresholds,
        format=args.format,
        progress=True,
    )
    report_errors(errors)
    print(format_table(result))
    if args.json:
        write_json(args.json, result)
    return 0


def _cache(args: argparse.Namespace) -> int:
    from mmiad.features.cache import FeatureCache
    from mmiad.features.registry import default_cache_dir

    root = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    cache = FeatureCache(root / "features")
    if args.action == "clear":
        log(f"removed {cache.clear()}")
    else:
        print(cache.report())
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add the data sub-commands to the top-level parser."""
    synth = commands.add_parser("synth", help="write a synthetic dataset (MVTec 3D-AD or native Eyecandies layout)")
    synth.add_argument("--out", required=True, help="output folder (the dataset root)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (same seed, same files)")
    synth.add_argument("--preset", default="demo", choices=["tiny", "demo"], help="size preset")
    synth.add_argument("--categories", help="comma-separated subset of categories")
    synth.add_argument("--image-size", type=int, help="image side in pixels (overrides the preset)")
    synth.add_argument("--overwrite", action="store_true", help="replace categories already in --out")
    synth.add_argument("--format", default="mvtec3d", choices=["mvtec3d", "eyecandies"], help="layout to write")
    synth.set_defaults(handler=_synth)

    preprocess = commands.add_parser("preprocess", help="remove the background plane and clutter (cached copies)")
    preprocess.add_argument("--data", required=True, help="dataset root")
    add_format_option(preprocess)
    preprocess.add_argument("--profile", default="cfm", help="cfm (keeps RGB background), m3dm (zeroes it), none")
    preprocess.add_argument("--categories", help="comma-separated subset of categories")
    preprocess.add_argument("--cache-dir", help="cache folder (default $MMIAD_CACHE or ~/.cache/mmiad)")
    preprocess.set_defaults(handler=_preprocess)

    evaluate = commands.add_parser("evaluate", help="score anomaly maps stored as the official evaluation expects")
    evaluate.add_argument("--data", required=True, help="dataset root with the ground truth")
    add_format_option(evaluate)
    evaluate.add_argument("--maps", required=True, help="DIR/<category>/test/<defect>/<NNN>.tiff")
    evaluate.add_argument("--json", help="write the metrics as JSON here")
    evaluate.add_argument("--categories", help="comma-separated subset of categories")
    evaluate.add_argument("--aupro", default="exact", choices=["exact", "compat"], help="AUPRO curve (default exact)")
    evaluate.add_argument("--num-thresholds", type=int, default=99, help="thresholds of the compat AUPRO (99 CFM)")
    evaluate.set_defaults(handler=_evaluate)

    cache = commands.add_parser("cache", help="show or clear the feature cache")
    cache.add_argument("action", choices=["info", "clear"])
    cache.add_argument("--cache-dir", help="cache folder (default $MMIAD_CACHE or ~/.cache/mmiad)")
    cache.set_defaults(handler=_cache)
