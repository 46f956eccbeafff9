"""Uni-RCM specifics: the ORQ fit time at the paper's sizes, and adding a category to a trained unified model.

``python -m mmiad.bench orq`` fits one k-means pass at the paper's codebook sizes and extrapolates linearly in
the number of features, iterations and layers (k-means cost is linear in each). ``python -m mmiad.bench extend``
trains a unified Uni-RCM on all but the last synthetic category, adds the last one with
``extend_run`` (replay of the earlier categories), and compares the earlier categories' metrics with the model
before extending and with a model retrained from scratch on every category.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from mmiad.bench.accuracy import UNIRCM, _cell
from mmiad.bench.common import machine_description, replace_section

PAPER_ORQ = {"2D (DINO, 768-d, K=4096)": (768, 4096), "3D (Point-MAE, 1152-d, K=1024)": (1152, 1024)}


def _orq_command(args: argparse.Namespace) -> int:
    from mmiad.methods.unircm.orq import ResidualQuantizer, faiss_available

    lines = [
        f"| modality | k-means | measured: N, K, layers, iterations | seconds | per iteration·layer | "
        f"extrapolated: N={args.target_n:,}, 4 layers, 20 iterations |",
        "|---|---|---|---|---|---|",
    ]
    backends = [b for b in args.backends.split(",") if b != "faiss" or faiss_available()]
    for name, (dim, codes) in PAPER_ORQ.items():
        features = torch.randn(args.n, dim, generator=torch.Generator().manual_seed(0))
        for backend in backends:
            quantizer = ResidualQuantizer(
                [codes] * args.layers, iterations=args.iterations, seed=0, use_faiss=backend == "faiss"
            )
            started = time.perf_counter()
            quantizer.fit(features)
            seconds = time.perf_counter() - started
            per = seconds / (args.iterations * args.layers)
            total = per * (args.target_n / args.n) * 4 * 20
            lines.append(
                f"| {name} | {backend} | {args.n:,}, {codes}, {args.layers}, {args.iterations} | {seconds:.1f} | "
                f"{per:.2f} s | {total / 60:.1f} min |"
            )
    body = (
        "### Uni-RCM offline residual quantizer: fit time at the paper's sizes\n\n"
        f"Command: `python -m mmiad.bench orq --n {args.n} --iterations {args.iterations} --layers {args.layers} "
        f"--backends {args.backends}`  \n"
        f"Machine: {machine_description()}  \n"
        "k-means on random features, full batch in chunks (torch; faiss from the same initial centres when "
        "installed); the cost is linear in features, iterations and "
        f"layers, so the last column scales the measured time per iteration and layer to {args.target_n:,} "
        "features (`orq_max_points`), 4 layers and 20 iterations (the official settings). The full unified MVTec "
        "3D-AD training set has ~4 M foreground patches at 56×56; fitting on all of them on 2 CPU cores would take "
        "~40× longer than this column, which is why `orq_max_points` subsamples (or use a GPU, `--set device=cuda`, "
        "or faiss).\n\n" + "\n".join(lines)
    )
    replace_section(Path(args.out), "orq", body)
    print(body)
    return 0


def _extend_command(args: argparse.Namespace) -> int:
    from mmiad.data.synthetic import generate_dataset
    from mmiad.engine import evaluate_run, extend_run, train_run

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="mmiad-bench-"))
    data = generate_dataset(work / "data", preset="demo", seed=args.seed, overwrite=True)
    cache = str(work / "cache")
    categories = sorted(p.name for p in data.iterdir() if p.is_dir())
    earlier, added = categories[:-1], categories[-1]
    hparams = dict(UNIRCM)
    train_run("unircm", data, work / "earlier", categories=earlier, unified=True, hparams=hparams, cache_dir=cache)
    before, _ = evaluate_run(work / "earlier", data, categories=earlier, cache_dir=cache)
    started = time.perf_counter()
    extend_run(work / "earlier", data, [added], epochs=args.epochs, cache_dir=cache)
    extend_seconds = time.perf_counter() - started
    extended, _ = evaluate_run(work / "earlier", data, cache_dir=cache)
    started = time.perf_counter()
    train_run("unircm", data, work / "scratch", unified=True, hparams=hparams, cache_dir=cache)
    scratch_seconds = time.perf_counter() - started
    scratch, _ = evaluate_run(work / "scratch", data, cache_dir=cache)

    def mean_of(result: dict, names: list[str], key: str) -> float:
        return sum(result["per_category"][n][key] for n in names) / len(names)

    lines = ["| model | earlier categories I-AUROC | AUPRO@30% | new category I-AUROC | AUPRO@30% | time s |"]
    lines.append("|---|---|---|---|---|---|")
    rows = (
        (f"trained on {', '.join(earlier)}", before, None, float("nan")),
        (f"+ {added} by extend ({args.epochs} epochs, replay)", extended, added, extend_seconds),
        ("retrained from scratch on all", scratch, added, scratch_seconds),
    )
    for label, result, new, seconds in rows:
        new_cells = (
            f"{_cell(result['per_category'][new]['image_auroc'])} | {_cell(result['per_category'][new]['aupro@0.3'])}"
            if new
            else "— | —"
        )
        lines.append(
            f"| {label} | {mean_of(result, earlier, 'image_auroc'):.3f} | {mean_of(result, earlier, 'aupro@0.3'):.3f} "
            f"| {new_cells} | {'—' if seconds != seconds else f'{seconds:.0f}'} |"
        )
    body = (
        "### Uni-RCM: adding a category to a trained unified model\n\n"
        f"Command: `python -m mmiad.bench extend` (synthetic `demo`, seed {args.seed}; Uni-RCM narrowed as in the "
        f"ablation table). `mmiad train --resume RUN --add-categories {added}` extends the ORQ codebooks with codes "
        "for the new category and fine-tunes the mapping on the new samples plus replayed samples of the earlier "
        f"categories; thresholds are recalibrated.  \nMachine: {machine_description()}\n\n" + "\n".join(lines)
    )
    replace_section(Path(args.out), "extend", body)
    print(body)
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``orq`` and ``extend`` to ``python -m mmiad.bench``."""
    orq = commands.add_parser("orq", help="ORQ fit time at the paper's codebook sizes")
    orq.add_argument("--out", default="BENCHMARKS.md")
    orq.add_argument("--n", type=int, default=20_000, help="features in the measured fit")
    orq.add_argument("--iterations", type=int, default=2)
    orq.add_argument("--layers", type=int, default=1, help="codebooks fitted in the measured run (paper: 4)")
    orq.add_argument("--backends", default="torch,faiss", help="k-means paths to time (faiss when installed)")
    orq.add_argument("--target-n", type=int, default=100_000)
    orq.set_defaults(handler=_orq_command)
    extend = commands.add_parser("extend", help="add a category to a unified Uni-RCM vs retraining")
    extend.add_argument("--out", default="BENCHMARKS.md")
    extend.add_argument("--seed", type=int, default=0)
    extend.add_argument("--epochs", type=int, default=20)
    extend.add_argument("--work")
    extend.set_defaults(handler=_extend_command)
