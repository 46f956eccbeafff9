"""``python -m mmiad.bench glfm``: GLFM on the synthetic demo data, multi-class and single-class, per defect type.

GLFM reads the point cloud only, so a defect that changes colour alone (``stain``) is invisible to it; the
per-defect table shows which defect types it sees. The multi-class model (K prototypes, one model for every
category) is compared with one K = 1 model per category, which shares the multi-class run's adapted extractor,
as the official single-class runs share ``pointmae_adapted.pth``. Without the Point-MAE weights here the
extractor is random (seeded): the numbers show the machinery and its costs, not GLFM's accuracy.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmiad.bench.common import machine_description, replace_section


def per_defect(predictions: Sequence[Any]) -> dict[str, float]:
    """Image AUROC of good samples against each defect type, pooled over categories."""
    from mmiad.metrics.roc import image_auroc

    good = [p.pred_score for p in predictions if p.label == 0]
    kinds = sorted({p.record.defect_type for p in predictions if p.label == 1})
    table = {}
    for kind in kinds:
        bad = [p.pred_score for p in predictions if p.label == 1 and p.record.defect_type == kind]
        table[kind] = image_auroc(np.r_[np.zeros(len(good)), np.ones(len(bad))], np.r_[good, bad])
    return table


def _command(args: argparse.Namespace) -> int:
    from mmiad.data.formats import open_dataset
    from mmiad.data.synthetic import generate_dataset
    from mmiad.engine import evaluate_predictions
    from mmiad.methods.glfm import GLFM
    from mmiad.utils.memory import own_peak_rss_mb

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="mmiad-glfm-"))
    data = work / "data"
    if not data.is_dir():
        generate_dataset(data, preset="demo", seed=args.seed)
    dataset = open_dataset(data)
    categories = dataset.categories()
    train = {c: dataset.records(c, "train") for c in categories}
    test = {c: dataset.records(c, "test") for c in categories}
    hparams: dict[str, Any] = {
        "extractors": args.extractors,
        "random_init": True,
        "image_size": args.image_size,
        "num_group": args.groups,
        "group_size": args.group_size,
        "adapt_epochs": args.adapt_epochs,
        "adapt_steps": args.adapt_steps,
        "device": "cpu",
    }
    cache = str(work / "cache")
    rows: dict[str, dict[str, Any]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        multi = GLFM(cache_dir=cache, prototypes=args.prototypes, **hparams)
        multi.fit([r for c in categories for r in train[c]])
        started = time.perf_counter()
        predictions = {c: list(multi.predict(test[c])) for c in categories}
        rows["multi-class"] = {
            "stages": {**multi.stage_seconds_, "test": time.perf_counter() - started},
            "metrics": {c: evaluate_predictions(p) for c, p in predictions.items()},
            "defects": per_defect([p for c in categories for p in predictions[c]]),
            "peak_mb": own_peak_rss_mb(),
            "bank_rows": sum(int(b.shape[0]) for b in multi.banks_),
        }
        single_predictions, seconds, bank_rows = [], {"features_and_memories": 0.0, "test": 0.0}, 0
        metrics = {}
        for category in categories:
            single = GLFM(cache_dir=cache, prototypes=1, **{**hparams, "adaptation": "none"})
            single._pipeline = multi.pipeline  # the multi-class run's adapted extractor, as the official runs
            single.fit(train[category])
            seconds["features_and_memories"] += single.stage_seconds_["features_and_memories"]
            started = time.perf_counter()
            found = list(single.predict(test[category]))
            seconds["test"] += time.perf_counter() - started
            metrics[category] = evaluate_predictions(found)
            single_predictions += found
            bank_rows += int(single.banks_[0].shape[0])
        rows["single-class (K=1 each)"] = {
            "stages": seconds,
            "metrics": metrics,
            "defects": per_defect(single_predictions),
            "peak_mb": own_peak_rss_mb(),
            "bank_rows": bank_rows,
        }
    body = _markdown(rows, categories, args)
    replace_section(Path(args.out), "glfm", body)
    print(body)
    return 0


def _markdown(rows: dict[str, dict[str, Any]], categories: Sequence[str], args: argparse.Namespace) -> str:
    keys = (("image_auroc", "I-AUROC"), ("pixel_auroc", "P-AUROC"), ("aupro@0.3", "AUPRO@30%"))
    lines = ["| run | metric | " + " | ".join(categories) + " | mean |", "|---|---|" + "---|" * (len(categories) + 1)]
    for name, row in rows.items():
        for key, title in keys:
            values = [float(row["metrics"][c][key]) for c in categories]
            cells = " | ".join(f"{v:.3f}" for v in values)
            lines.append(f"| {name} | {title} | {cells} | {np.mean(values):.3f} |")
    kinds = sorted({k for row in rows.values() for k in row["defects"]})
    lines += ["", "| run | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{row['defects'].get(k, float('nan')):.3f}" for k in kinds) + " |")
    header = "| run | preprocess + Stage I s | features + memories s | test s | memory rows | process peak RSS MB |"
    lines += ["", header, "|---|---|---|---|---|---|"]
    for name, row in rows.items():
        stages = row["stages"]
        first = stages.get("preprocess_and_stage_one")
        lines.append(
            f"| {name} | {'shared' if first is None else f'{first:.0f}'} | {stages['features_and_memories']:.0f} | "
            f"{stages['test']:.0f} | {row['bank_rows']:,} | {row['peak_mb']:.0f} |"
        )
    return (
        "### GLFM on the synthetic demo data: multi-class vs single-class, per defect type\n\n"
        f"Command: `python -m mmiad.bench glfm --image-size {args.image_size} --groups {args.groups} "
        f"--group-size {args.group_size} --adapt-epochs {args.adapt_epochs} --adapt-steps {args.adapt_steps} "
        f"--prototypes {args.prototypes} --extractors {args.extractors}` (demo preset, seed {args.seed}; "
        + (
            "random Point-MAE weights, so the metrics show the machinery, not GLFM's accuracy"
            if args.extractors == "glfm"
            else "weight-free point features, so Stage I is skipped"
        )
        + ").  \n"
        f"Machine: {machine_description()}\n\n" + "\n".join(lines)
    )


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``glfm`` to ``python -m mmiad.bench``."""
    parser = commands.add_parser("glfm", help="GLFM multi- vs single-class on the demo data, per defect type")
    parser.add_argument("--out", default="BENCHMARKS.md")
    parser.add_argument("--work")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--groups", type=int, default=256, help="FPS centres per cloud (official 1024)")
    parser.add_argument("--group-size", type=int, default=32, help="points per group (official 128)")
    parser.add_argument("--adapt-epochs", type=int, default=2, help="Stage I epochs (official 100)")
    parser.add_argument("--adapt-steps", type=int, default=20, help="Stage I clouds per epoch (official 100)")
    parser.add_argument("--prototypes", type=int, default=10)
    parser.add_argument("--extractors", default="glfm", help="glfm (random Point-MAE here) or none+fpfh (no Stage I)")
    parser.set_defaults(handler=_command)
