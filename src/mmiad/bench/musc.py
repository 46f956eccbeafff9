"""MuSc-V2 (zero-shot) on the synthetic data: accuracy with both extractor presets, the ablation, and scaling.

``python -m mmiad.bench musc`` writes three sections of ``BENCHMARKS.md``:

* accuracy per category of each ``demo`` test split scored as one batch, with the weight-free preset and with
  DINO ViT-B/8 + Point-MAE under ``--random-init`` (no pretrained weights exist on our build machines, so the deep
  row measures speed, not what the paper's backbone achieves);
* the paper's ablation form (MSM only, +SNAMD, +IPG, +CAE, +RsCon), weight-free;
* time and peak memory against batch size: each size runs in a fresh child process (peak = its ``VmHWM``) on
  one category synthesised with enough test samples (70 % nominal), weight-free; token extraction and mutual
  scoring are timed apart, since only the latter is O(N²).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from mmiad.bench.common import machine_description, replace_section

# Ablation rows: (name, token settings, scoring settings). Rows sharing token settings reuse the same tokens.
ABLATION: tuple[tuple[str, dict[str, Any], dict[str, Any]], ...] = (
    ("MSM only", {"r_list": [1], "ipg": False}, {"cae": False, "rscon_k": [0]}),
    ("+ SNAMD", {"ipg": False}, {"cae": False, "rscon_k": [0]}),
    ("+ IPG", {}, {"cae": False, "rscon_k": [0]}),
    ("+ CAE", {}, {"rscon_k": [0]}),
    ("+ RsCon (MuSc-V2)", {}, {}),
)
DEEP = {"extractors": "dino-pointmae", "random_init": True}
BATCH_SIZES = (20, 50, 100, 200)
REAL_SAMPLES = 20  # scale runs extract this many samples and replicate their tokens up to the batch size
_WORKER_FLAG = "--scale-worker"


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _tokens(
    data: Path, category: str, options: dict[str, Any], cache: str, limit: int | None = None
) -> tuple[list, float]:
    """Tokens of a category's test split (``limit`` samples spread over it) under ``options``, and the seconds."""
    from mmiad.data.mvtec3d import list_records
    from mmiad.methods.musc import MuSc
    from mmiad.methods.musc.tokens import extract_tokens

    model = MuSc(cache_dir=cache, **options)
    records = list_records(data, category, "test")
    if limit is not None and limit < len(records):  # spread over the defect folders and good: both labels present
        records = records[:: len(records) // limit][:limit]
    prepared = model.pipeline.preprocess(records)
    started = time.perf_counter()
    tokens = [extract_tokens(model.pipeline, record, model.config) for record in prepared]
    return tokens, time.perf_counter() - started


def _score(tokens: list, options: dict[str, Any]) -> tuple[dict[str, float], float]:
    from mmiad.engine.evaluation import evaluate_predictions
    from mmiad.methods.musc import MuSc

    started = time.perf_counter()
    predictions = MuSc(**options).score_tokens(tokens)
    seconds = time.perf_counter() - started
    return evaluate_predictions(predictions), seconds


def _metrics_rows(data: Path, cache: str, categories: list[str]) -> dict[str, dict[str, Any]]:
    """Per ablation row: per-category metrics, extraction and scoring seconds, sample count (weight-free)."""
    rows: dict[str, dict[str, Any]] = {
        name: {"per_category": {}, "seconds": 0.0, "samples": 0} for name, _, _ in ABLATION
    }
    for category in categories:
        token_sets: dict[str, tuple[list, float]] = {}
        for name, token_options, score_options in ABLATION:
            key = json.dumps(token_options, sort_keys=True)
            if key not in token_sets:
                token_sets[key] = _tokens(data, category, token_options, cache)
            tokens, extract_s = token_sets[key]
            metrics, score_s = _score(tokens, {**token_options, **score_options})
            row = rows[name]
            row["per_category"][category] = metrics
            row["seconds"] += extract_s + score_s
            row["samples"] += len(tokens)
            print(name, category, metrics, f"extract {extract_s:.0f}s score {score_s:.0f}s", flush=True)
    return rows


def accuracy_and_ablation(
    data: Path, cache: str, categories: list[str], deep_categories: list[str], deep_samples: int | None
) -> tuple[str, str]:
    """The accuracy table (weight-free; deep random-init on ``deep_categories``, ``deep_samples`` each) and the
    ablation, on ``categories``."""
    from mmiad.metrics import summarize

    rows = _metrics_rows(data, cache, categories)
    ablation = [
        "| variant | SNAMD | IPG | CAE | RsCon | I-AUROC | P-AUROC | AUPRO@30% | AUPRO@1% |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for step, (name, _, _) in enumerate(ABLATION):
        mean = summarize(rows[name]["per_category"])["mean"]
        marks = ["✓" if step >= k else "" for k in (1, 2, 3, 4)]
        ablation.append(
            f"| {name} | {' | '.join(marks)} | {_fmt(mean['image_auroc'])} | {_fmt(mean['pixel_auroc'])} | "
            f"{_fmt(mean['aupro@0.3'])} | {_fmt(mean['aupro@0.01'])} |"
        )
    full = rows[ABLATION[-1][0]]
    deep: dict[str, Any] = {"per_category": {}, "seconds": 0.0, "samples": 0}
    for category in deep_categories:
        tokens, extract_s = _tokens(data, category, DEEP, cache, deep_samples)
        metrics, score_s = _score(tokens, DEEP)
        deep["per_category"][category] = metrics
        deep["seconds"] += extract_s + score_s
        deep["samples"] += len(tokens)
        print("deep", category, metrics, f"extract {extract_s:.0f}s score {score_s:.0f}s", flush=True)
    accuracy = [
        f"| method | {' | '.join(categories)} | mean | P-AUROC | AUPRO@1% | samples/s |",
        "|---" * (len(categories) + 5) + "|",
    ]
    for name, row in (("MuSc-V2 weightfree", full), ("MuSc-V2 dino-pointmae (random init)", deep)):
        result = summarize(row["per_category"])
        cells = [
            f"{_fmt(result['per_category'][c]['image_auroc'])} / {_fmt(result['per_category'][c]['aupro@0.3'])}"
            if c in result["per_category"]
            else "—"
            for c in categories
        ]
        mean = result["mean"]
        rate = row["samples"] / row["seconds"] if row["seconds"] else float("nan")
        accuracy.append(
            f"| {name} | {' | '.join(cells)} | {_fmt(mean['image_auroc'])} / {_fmt(mean['aupro@0.3'])} | "
            f"{_fmt(mean['pixel_auroc'])} | {_fmt(mean['aupro@0.01'])} | {rate:.2f} |"
        )
    return "\n".join(accuracy), "\n".join(ablation)


def _scale_worker(data: str, size: int, divide_num: int, cache: str) -> None:
    """Child process: tokens of REAL_SAMPLES samples replicated (cloned) to ``size``, then mutual scoring.

    Scoring cost depends on the batch size and token shapes, not on the token values, so replicated tokens time
    it faithfully while keeping extraction (linear in N, reported per sample) out of a shared 2-core budget.
    """
    from dataclasses import replace

    from mmiad.data.mvtec3d import list_records
    from mmiad.methods.musc import MuSc
    from mmiad.methods.musc.tokens import extract_tokens
    from mmiad.utils.memory import own_peak_rss_mb

    records = list_records(data, "puck", "test")[:REAL_SAMPLES]
    model = MuSc(cache_dir=cache, divide_num=divide_num)
    prepared = model.pipeline.preprocess(records)
    started = time.perf_counter()
    real = [extract_tokens(model.pipeline, record, model.config) for record in prepared]
    extract_s = (time.perf_counter() - started) / len(real)
    tokens = [
        replace(t, image=[x.clone() for x in t.image], points=[x.clone() for x in t.points])
        for t in (real[i % len(real)] for i in range(size))
    ]
    started = time.perf_counter()
    predictions = model.score_tokens(tokens)
    score_s = time.perf_counter() - started
    result = {"samples": len(predictions), "extract_s": extract_s, "score_s": score_s, "peak_mb": own_peak_rss_mb()}
    print(json.dumps(result))


def scale_section(data: Path, cache: str, sizes: tuple[int, ...]) -> str:
    """Time and peak memory per batch size, one fresh child process each."""
    lines = [
        "| batch | subsets | mutual scoring s | scoring ms / sample | peak MB | extraction s / sample |",
        "|---|---|---|---|---|---|",
    ]
    runs = [(size, 1) for size in sizes] + [(max(sizes), 4)]
    for size, divide in runs:
        command = [sys.executable, "-m", "mmiad.bench.musc", _WORKER_FLAG, str(data), str(size), str(divide), cache]
        child = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy(), check=False)
        if child.returncode != 0:
            raise RuntimeError(f"batch {size} failed:\n{child.stderr[-3000:]}")
        row = json.loads(child.stdout.strip().splitlines()[-1])
        lines.append(
            f"| {row['samples']} | {divide} | {row['score_s']:.1f} | {1000 * row['score_s'] / row['samples']:.0f} | "
            f"{row['peak_mb']:.0f} | {row['extract_s']:.1f} |"
        )
        print(lines[-1], flush=True)
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    from mmiad.data.synthetic import generate_dataset

    work = Path(args.work)
    data, scale = work / "demo", work / "scale"
    if not data.is_dir():
        generate_dataset(data, preset="demo", seed=0)
    cache = str(work / "cache")
    machine = machine_description()
    out = Path(args.out)
    parts = set(args.parts.split(","))
    if "scale" in parts:
        if not scale.is_dir():
            generate_dataset(
                scale,
                preset="demo",
                seed=1,
                categories=["puck"],
                n_train=1,
                n_validation=1,
                n_test_good=140,
                n_per_defect=10,
            )
        sizes = tuple(int(s) for s in args.sizes.split(","))
        table = scale_section(scale, str(work / "cache-scale"), sizes)
        replace_section(out, "musc-scale", _SCALE_TEXT.format(machine=machine, table=table, real=REAL_SAMPLES))
    if "accuracy" in parts:
        from mmiad.data.mvtec3d import list_categories

        categories = args.categories.split(",") if args.categories else list_categories(data)
        deep_samples = args.deep_samples or None
        deep_categories = args.deep_categories.split(",")
        accuracy, ablation = accuracy_and_ablation(data, cache, categories, deep_categories, deep_samples)
        deep = f"{args.deep_categories} ({args.deep_samples or 'all'} test samples)"
        replace_section(out, "musc-accuracy", _ACCURACY_TEXT.format(machine=machine, table=accuracy, deep=deep))
        replace_section(out, "musc-ablation", _ABLATION_TEXT.format(table=ablation))
    return 0


_ACCURACY_TEXT = """
### MuSc-V2, zero-shot (no training; each category's test split scores itself)

Command: `python -m mmiad.bench musc --parts accuracy` (writes this and the ablation; synthetic `demo` data,
seed 0: the same 96 test images as the tables above, 24 per category scored as one batch each; official
settings: layers 3/7/11, r_list 1/3/5, IPG, CAE, RsCon k 1/7). Cells are I-AUROC / AUPRO@30%; samples/s counts
token extraction (with the weight-free features already in the feature cache) and mutual scoring. The
`dino-pointmae` row uses **random weights** (`--random-init`): its accuracy means nothing, only its speed counts;
to bound the time on a shared 2-core CPU it was run on `{deep}` only.
Machine: {machine}, shared with other jobs while this ran.

{table}
"""

_ABLATION_TEXT = """
### MuSc-V2 ablation (the paper's form; weight-free, means over the categories of the table above)

Command: `python -m mmiad.bench musc --parts accuracy` (same run as the table above). Each row adds one module
to the one above: MSM alone (r_list 1, kNN groups, each modality scored alone and the maps summed, image
score = map maximum), then SNAMD (r_list 1/3/5), IPG, CAE and RsCon (the full method). With FPFH, IPG changes
which points a group's descriptor is averaged over (mmiad's grouping for per-point extractors; the official code
has IPG only for Point-MAE).

{table}
"""

_SCALE_TEXT = """
### MuSc-V2: time and peak memory against batch size

Command: `python -m mmiad.bench musc --parts scale` — one synthetic category (`puck`, seed 1) with 200 test samples
(140 good), weight-free preset, official settings, CPU; every row is a fresh process (peak = its own `VmHWM`,
including the tokens it holds). To fit a shared 2-core budget each process extracts the tokens of {real} real samples
and replicates them (as copies) to the batch size: scoring cost depends on N and the token shapes, not on their
values. Extraction is linear in N (its per-sample cost is the last column); mutual scoring is O(N²), so its cost
per sample grows linearly with N. The last row scores 200 samples in 4 random subsets of 50 (`divide_num=4`).
Distances are computed one query sample against blocks of `chunk_size`=16 reference samples, so scoring memory
does not grow with N; what grows is the tokens held for the batch.
Machine: {machine}, shared with other jobs while this ran. Not measured on a GPU (MuSc runs on the CPU here).

{table}
"""


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``musc`` to the benchmark command."""
    parser = commands.add_parser("musc", help="MuSc-V2 zero-shot: accuracy, ablation, time and memory vs batch size")
    parser.add_argument("--work", default="bench_musc", help="folder for the synthetic data and caches")
    parser.add_argument("--out", default="BENCHMARKS.md", help="markdown file whose musc sections are replaced")
    parser.add_argument("--parts", default="accuracy,scale", help="comma-separated: accuracy (with ablation), scale")
    parser.add_argument("--deep-categories", default="puck", help="categories for the random-init deep row")
    parser.add_argument("--deep-samples", type=int, default=8, help="test samples per deep category (0: all)")
    parser.add_argument("--categories", help="categories for the weight-free rows and the ablation (default: all)")
    parser.add_argument("--sizes", default=",".join(map(str, BATCH_SIZES)), help="batch sizes for the scale part")
    parser.set_defaults(handler=_run)


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == _WORKER_FLAG:
        _scale_worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
