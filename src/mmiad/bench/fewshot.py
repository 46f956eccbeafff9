"""``python -m mmiad.bench fewshot``: every method at 1/2/4 nominal samples per category, MuSc at 0.

Each method trains through ``train_run`` with ``--shots K`` under the one protocol (:func:`mmiad.engine.runs.
select_few_shot`): with ``random`` selection the table is the mean (± standard deviation) over ``--draws`` seeded
draws 0, 1, 2..., the same files for every method; with ``first`` there is one draw. All runs share one feature
cache (preprocessed copies and features), so the median times are for cached features: the first run of a method
extracted them. s/sample is the test pass divided by the test samples. A method that is unified by design
(Uni-RCM, GLFM, RAD) trains one model over every category, with or without ``--unified``. Methods run with their
``tiny_hparams`` (or their defaults) on a synthetic preset: a protocol check and a cost comparison, not a paper's
numbers.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from mmiad.bench.common import machine_description, replace_section
from mmiad.cli.common import parse_assignments

METRICS = ("image_auroc", "pixel_auroc", "aupro@0.3")


def _cell(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def _test_samples(data: Path, format: str | None) -> int:
    from mmiad.data.formats import open_dataset

    dataset = open_dataset(data, format)
    return sum(len(dataset.records(c, "test", errors=[])) for c in dataset.categories())


def _few_shot_rows(args: argparse.Namespace, data: Path, work: Path, samples: int) -> list[str]:
    from mmiad.engine import evaluate_run, train_run
    from mmiad.methods.registry import get_method

    rows = []
    draws = list(range(args.draws)) if args.selection == "random" else [0]
    for method in args.methods.split(","):
        hparams = dict(get_method(method).tiny_hparams) if args.tiny_hparams else {}
        hparams.update(parse_assignments(args.set))
        for shots in (int(s) for s in args.shots.split(",")):
            results: dict[str, list[float]] = {m: [] for m in METRICS}
            train_seconds, test_seconds = [], []
            for seed in draws:
                run = work / f"{args.section}-{method}-{shots}-{seed}"
                started = time.perf_counter()
                train_run(
                    method,
                    data,
                    run,
                    unified=args.unified or get_method(method).unified,
                    shots=shots,
                    seed=seed,
                    shot_selection=args.selection,
                    hparams=hparams,
                    cache_dir=str(work / "cache"),
                    fallback=False,
                )
                train_seconds.append(time.perf_counter() - started)
                started = time.perf_counter()
                result, _ = evaluate_run(run, data, cache_dir=str(work / "cache"))
                test_seconds.append((time.perf_counter() - started) / max(1, samples))
                for metric in METRICS:
                    results[metric].append(float(result["mean"][metric]))
            cells = " | ".join(_cell(results[m]) for m in METRICS)
            rows.append(
                f"| {method} | {shots} | {cells} | {statistics.median(train_seconds):.1f} | "
                f"{statistics.median(test_seconds):.3f} |"
            )
            print(rows[-1], flush=True)
    return rows


def _musc_row(data: Path, work: Path, samples: int, tiny: bool) -> str:
    from mmiad.engine.zero_shot import evaluate_zero_shot

    hparams: dict[str, Any] = {"image_size": 64} if tiny else {}
    started = time.perf_counter()
    result, _ = evaluate_zero_shot(data, hparams, method="musc", cache_dir=str(work / "musc-cache"))
    per_sample = (time.perf_counter() - started) / max(1, samples)
    cells = " | ".join(_cell([float(result["mean"][m])]) for m in METRICS)
    return f"| musc | 0 | {cells} | — | {per_sample:.3f} |"


def _command(args: argparse.Namespace) -> int:
    from mmiad.data.synthetic import generate_dataset

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="mmiad-fewshot-"))
    if args.data:  # an earlier table's data: its feature cache under the same --work stays valid
        data = Path(args.data)
    else:
        data = generate_dataset(work / "data", preset=args.preset, seed=args.data_seed, overwrite=True)
    samples = _test_samples(data, None)
    header = [
        "| method | shots | I-AUROC | P-AUROC | AUPRO@30% | train s (median) | test s/sample (median) |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = _few_shot_rows(args, data, work, samples)
    if args.musc:
        rows.append(_musc_row(data, work, samples, args.tiny_hparams))
        print(rows[-1], flush=True)
    flags = f"--preset {args.preset} --methods {args.methods} --shots {args.shots} --selection {args.selection}"
    flags += f" --draws {args.draws}" + (" --musc" if args.musc else "") + (" --unified" if args.unified else "")
    flags += "".join(f" --set {item}" for item in args.set or []) + ("" if args.tiny_hparams else " --no-tiny-hparams")
    flags += f" --data {args.data}" if args.data else ""
    draws = f"mean ± sd over {args.draws} seeded draws" if args.selection == "random" else "the first K files"
    body = (
        f"Command: `python -m mmiad.bench fewshot {flags}`  \n"
        f"Machine: {machine_description()}  \n"
        f"Synthetic `{args.preset}` data (seed {args.data_seed}, {samples} test samples); each method with "
        f"{'its `tiny_hparams`' if args.tiny_hparams else 'its defaults'}; {draws} (the same files for every "
        "method); no fallback models; one feature cache for all runs (median times: cached features).\n\n"
        + "\n".join(header + rows)
    )
    if args.out:
        replace_section(Path(args.out), args.section, body)
    print(body)
    return 0


def _rad_cost_command(args: argparse.Namespace) -> int:
    """RAD's scoring cost at the official sizes (28×28 grid, 768-d, 4 levels) on random unit tokens."""
    import torch

    from mmiad.methods.rad import RAD
    from mmiad.methods.rad.memory import RadMemory

    grid, channels, levels = (28, 28), 768, 4
    generator = torch.Generator().manual_seed(0)
    model = RAD(device=args.device, k_image=args.k, pos_radius=args.radius, memory_dtype=args.dtype)
    memory = RadMemory(grid, args.dtype)
    for _ in range(args.images):
        memory.add(torch.randn(channels, generator=generator), [torch.randn(784, channels, generator=generator)] * 4)
    memory.finish()
    model.memory_, model.grid_, model.fitted_ = memory, grid, True
    seconds, cpu_seconds = [], []
    for _ in range(args.repeats):
        query = (torch.randn(channels, generator=generator), [torch.randn(784, channels) for _ in range(levels)])
        started, cpu_started = time.perf_counter(), time.process_time()
        model.patch_scores((*query, None, None), grid)
        seconds.append(time.perf_counter() - started)
        cpu_seconds.append(time.process_time() - cpu_started)
    stored = sum(t.numel() * t.element_size() for t in memory.tensors().values()) / args.images
    body = (
        f"Command: `python -m mmiad.bench radcost --images {args.images} --k {args.k} --radius {args.radius} "
        f"--dtype {args.dtype} --repeats {args.repeats} --device {args.device}`  \n"
        f"Machine: {machine_description()}\n\n"
        "| memory dtype | bytes per image (stored tensors / images) | k_image | ρ | patch scoring s/image, wall "
        "(median; retrieval + 4 levels, no extraction) | CPU s/image (process time, all threads) |\n"
        "|---|---|---|---|---|---|\n"
        f"| {args.dtype} | {stored:,.0f} | {args.k} | {args.radius} | {statistics.median(seconds):.2f} | "
        f"{statistics.median(cpu_seconds):.2f} |"
    )
    if args.out:
        replace_section(Path(args.out), f"radcost-{args.dtype}", body)
    print(body)
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``fewshot`` and ``radcost`` to ``python -m mmiad.bench``."""
    cost = commands.add_parser("radcost", help="RAD's memory per image and scoring time at the official sizes")
    cost.add_argument("--out", help="markdown file whose radcost section to replace")
    cost.add_argument("--images", type=int, default=150, help="images in the memory")
    cost.add_argument("--k", type=int, default=150)
    cost.add_argument("--radius", type=int, default=1)
    cost.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    cost.add_argument("--repeats", type=int, default=5)
    cost.add_argument("--device", default="cpu")
    cost.set_defaults(handler=_rad_cost_command)
    parser = commands.add_parser("fewshot", help="every method at 1/2/4 shots (MuSc at 0) on synthetic data")
    parser.add_argument("--out", help="markdown file whose fewshot section to replace (e.g. BENCHMARKS.md)")
    parser.add_argument("--preset", default="tiny", help="synthetic preset (tiny, demo)")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--methods", default="rad,cfm", help="comma-separated registered methods")
    parser.add_argument("--shots", default="1,2,4")
    parser.add_argument("--selection", choices=["random", "first"], default="random")
    parser.add_argument("--draws", type=int, default=3, help="seeded draws per K for random selection")
    parser.add_argument("--musc", action="store_true", help="add MuSc's zero-shot row")
    parser.add_argument("--unified", action="store_true", help="one model over every category (RAD's setting)")
    parser.add_argument(
        "--no-tiny-hparams", dest="tiny_hparams", action="store_false", help="the methods' defaults instead"
    )
    parser.add_argument("--work", help="working folder (default: a fresh temporary one)")
    parser.add_argument("--data", help="use this dataset root instead of generating --preset (e.g. WORK/data)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="a hyperparameter for every method")
    parser.add_argument("--section", default="fewshot", help="name of the section of --out to replace")
    parser.set_defaults(handler=_command)
