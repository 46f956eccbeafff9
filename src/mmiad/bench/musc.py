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

ABLATION: tuple[tuple[str, dict[str, Any]], ...] = (
    ("MSM only", {"r_list": [1], "ipg": False, "cae": False, "rscon_k": [0]}),
    ("+ SNAMD", {"ipg": False, "cae": False, "rscon_k": [0]}),
    ("+ IPG", {"cae": False, "rscon_k": [0]}),
    ("+ CAE", {"rscon_k": [0]}),
    ("+ RsCon (MuSc-V2)", {}),
)
PRESETS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("weightfree", {"extractors": "weightfree"}),
    ("dino-pointmae (random init)", {"extractors": "dino-pointmae", "random_init": True}),
)
BATCH_SIZES = (20, 50, 100, 200)
_WORKER_FLAG = "--scale-worker"


def _evaluate(data: Path, hparams: dict[str, Any], cache: str) -> tuple[dict[str, Any], float, int]:
    from mmiad.data.mvtec3d import list_categories, list_records
    from mmiad.engine.zero_shot import evaluate_zero_shot

    samples = sum(len(list_records(data, c, "test")) for c in list_categories(data))
    started = time.perf_counter()
    result, errors = evaluate_zero_shot(data, hparams, cache_dir=cache)
    if errors:
        raise RuntimeError(f"bad samples in the benchmark data: {errors[:3]}")
    return result, time.perf_counter() - started, samples


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def accuracy_section(data: Path, cache: str, presets: list[str]) -> str:
    """Per-category I-AUROC / AUPRO@30% of each preset."""
    rows, categories = [], None
    for name, hparams in PRESETS:
        if name.split()[0] not in presets:
            continue
        result, seconds, samples = _evaluate(data, hparams, cache)
        categories = sorted(result["per_category"])
        per_category = [result["per_category"][c] for c in categories]
        cells = [f"{_fmt(m['image_auroc'])} / {_fmt(m['aupro@0.3'])}" for m in per_category]
        mean = result["mean"]
        rows.append(
            f"| MuSc-V2 {name} | {' | '.join(cells)} | {_fmt(mean['image_auroc'])} / {_fmt(mean['aupro@0.3'])} | "
            f"{_fmt(mean['pixel_auroc'])} | {_fmt(mean['aupro@0.01'])} | {samples / seconds:.2f} |"
        )
        print(rows[-1], flush=True)
    header = f"| method | {' | '.join(categories or [])} | mean | P-AUROC | AUPRO@1% | samples/s |"
    rule = "|---" * (len(categories or []) + 5) + "|"
    return "\n".join([header, rule, *rows])


def ablation_section(data: Path, cache: str) -> str:
    """The paper's ablation rows, weight-free, means over categories."""
    lines = [
        "| variant | SNAMD | IPG | CAE | RsCon | I-AUROC | P-AUROC | AUPRO@30% | AUPRO@1% | samples/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for step, (name, hparams) in enumerate(ABLATION):
        result, seconds, samples = _evaluate(data, {"extractors": "weightfree", **hparams}, cache)
        marks = ["✓" if step >= k else "" for k in (1, 2, 3, 4)]
        mean = result["mean"]
        lines.append(
            f"| {name} | {' | '.join(marks)} | {_fmt(mean['image_auroc'])} | {_fmt(mean['pixel_auroc'])} | "
            f"{_fmt(mean['aupro@0.3'])} | {_fmt(mean['aupro@0.01'])} | {samples / seconds:.2f} |"
        )
        print(lines[-1], flush=True)
    return "\n".join(lines)


def _scale_worker(data: str, size: int, divide_num: int, cache: str) -> None:
    """Child process: tokens for ``size`` samples, then mutual scoring; prints one JSON line."""
    from mmiad.data.mvtec3d import list_records
    from mmiad.methods.musc import MuSc
    from mmiad.methods.musc.tokens import extract_tokens
    from mmiad.utils.memory import own_peak_rss_mb

    records = list_records(data, "puck", "test")[:size]
    model = MuSc(cache_dir=cache, divide_num=divide_num)
    prepared = model.pipeline.preprocess(records)
    started = time.perf_counter()
    tokens = [extract_tokens(model.pipeline, record, model.config) for record in prepared]
    extracted = time.perf_counter()
    predictions = model.score_tokens(tokens)
    scored = time.perf_counter()
    print(
        json.dumps(
            {
                "samples": len(predictions),
                "extract_s": extracted - started,
                "score_s": scored - extracted,
                "peak_mb": own_peak_rss_mb(),
            }
        )
    )


def scale_section(data: Path, cache: str, sizes: tuple[int, ...]) -> str:
    """Time and peak memory per batch size, one fresh child process each."""
    lines = [
        "| batch | subsets | token extraction s | mutual scoring s | scoring ms / sample | peak MB |",
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
            f"| {row['samples']} | {divide} | {row['extract_s']:.1f} | {row['score_s']:.1f} | "
            f"{1000 * row['score_s'] / row['samples']:.0f} | {row['peak_mb']:.0f} |"
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
    if "accuracy" in parts:
        table = accuracy_section(data, cache, args.presets.split(","))
        replace_section(out, "musc-accuracy", _ACCURACY_TEXT.format(machine=machine, table=table))
    if "ablation" in parts:
        replace_section(out, "musc-ablation", _ABLATION_TEXT.format(table=ablation_section(data, cache)))
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
        replace_section(out, "musc-scale", _SCALE_TEXT.format(machine=machine, table=table))
    return 0


_ACCURACY_TEXT = """
### MuSc-V2, zero-shot (no training; each category's test split scores itself)

Command: `python -m mmiad.bench musc --parts accuracy` (synthetic `demo` data, seed 0: the same 96 test images as the
tables above, 24 per category scored as one batch each; official settings: layers 3/7/11, r_list 1/3/5, IPG, CAE,
RsCon k 1/7). Cells are I-AUROC / AUPRO@30%; samples/s includes reading, preprocessing (cached after the first
row) and token extraction. The `dino-pointmae` row uses **random weights** (`--random-init`): its accuracy means
nothing, only its speed counts.
Machine: {machine}, shared with other jobs while this ran.

{table}
"""

_ABLATION_TEXT = """
### MuSc-V2 ablation (the paper's form; weight-free, means over the 4 categories)

Command: `python -m mmiad.bench musc --parts ablation`. Each row adds one module to the one above: MSM alone
(r_list 1, kNN groups, each modality scored alone and the maps summed, image score = map maximum), then SNAMD
(r_list 1/3/5), IPG, CAE and RsCon (the full method). With FPFH, IPG changes which points a group's descriptor is
averaged over (mmiad's grouping for per-point extractors; the official code has IPG only for Point-MAE).

{table}
"""

_SCALE_TEXT = """
### MuSc-V2: time and peak memory against batch size

Command: `python -m mmiad.bench musc --parts scale` — one synthetic category (`puck`, seed 1) with 200 test samples
(140 good), weight-free preset, official settings, CPU; every row is a fresh process (peak = its own `VmHWM`,
including the tokens it holds). Token extraction is linear in the batch; mutual scoring is O(N²) (per sample it
grows linearly with N). The last row scores the 200 samples in 4 random subsets of 50 (`divide_num=4`).
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
    parser.add_argument("--parts", default="accuracy,ablation,scale", help="comma-separated subset")
    parser.add_argument("--presets", default="weightfree,dino-pointmae", help="extractor presets for accuracy")
    parser.add_argument("--sizes", default=",".join(map(str, BATCH_SIZES)), help="batch sizes for the scale part")
    parser.set_defaults(handler=_run)


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == _WORKER_FLAG:
        _scale_worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
