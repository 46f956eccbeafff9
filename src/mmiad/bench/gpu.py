"""``python -m mmiad.bench gpu``: every method and extractor preset on a *target* configuration against a *reference*.

The issue's question is whether a method computes on CUDA what it computes on the CPU. The bench answers it as
a comparison of two configurations, each a (device, precision) pair: the reference (default ``cpu``, ``fp32``)
and the target (default ``cuda``, ``fp32``). Both sides train and test every method of
:func:`~mmiad.methods.registry.available_methods` with the weight-free extractors and with the method's deep
backbone (``dino-pointmae``; BTF's paper backbone ``wrn50-fpfh``) at random weights and tiny sizes, on the same
synthetic data. Each side runs in its own fresh child process (``gpu-worker``) with its own empty feature cache,
so features are extracted on the side's own device and its peak RSS (``VmHWM``) is its own.

Agreement is checked per sample (image scores and anomaly maps) and on the metrics, within the tolerance of the
lower of the two precisions (:data:`TOLERANCES`). Any disagreement, and any run that fails on either side, makes
the command exit with :data:`EXIT_DISAGREE`: a CUDA-only failure cannot pass unnoticed. When a side's device is
absent the command runs nothing and exits with :data:`EXIT_NO_DEVICE` and one line saying CUDA is untested here.

Without a GPU, ``--target-device cpu --target-precision bf16`` exercises the whole bench and measures what bf16
changes against fp32.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmiad.bench.common import machine_description, replace_section
from mmiad.utils.compute import PRECISIONS, check_device_name, check_precision, device_present

#: Exit status when a score, map or metric disagrees beyond tolerance, or a run failed on either side.
EXIT_DISAGREE = 1
#: Exit status when the reference or target device is not present (nothing was run).
EXIT_NO_DEVICE = 3

#: The metrics compared between the sides (the columns of the seeds' Tab. 5).
METRICS = ("image_auroc", "pixel_auroc", "aupro@0.3", "aupro@0.01")
MB = 2**20


@dataclass(frozen=True)
class Tolerance:
    """How far the target may be from the reference.

    Score and map errors are measured as ``max |target − reference| / max |reference|`` over the whole array
    (every test sample's score; every pixel of every map): scores have no common scale across methods (cosine
    distances, kNN distances, products of both), and an element-wise relative error explodes on scores near 0.

    Attributes:
        score: Largest allowed scaled error of the image scores.
        map: Largest allowed scaled error of the anomaly maps.
        metric: Largest allowed absolute difference of each metric (I-AUROC, P-AUROC, AUPRO@30 %, AUPRO@1 %).
    """

    score: float
    map: float
    metric: float


#: Tolerance by the lower of the two sides' precisions.
#:
#: * ``fp32``: both sides compute in IEEE float32 (the worker turns TF32 off), so the sides differ only by the
#:   order of floating-point reductions (cuBLAS/cuDNN vs MKL/oneDNN): ~1e-6 relative per layer, a few 1e-6 after
#:   a 12-block ViT. 1e-4 leaves a margin of ~10× and still catches any real difference. Metrics can then only
#:   change through near-ties of two samples, so 1e-3 flags any reordering (investigate it).
#: * ``bf16``: 8 significand bits, unit roundoff 2^-8 ≈ 3.9e-3 per rounding. Through a dozen matrix products
#:   the errors add up to ~1 % of the features, and scores are differences of features (cosine or Euclidean
#:   distances), which amplifies relative error where features nearly agree: 5e-2 of the score scale. The
#:   metrics of the tiny synthetic test set move in steps of 1/(good × defective) ≈ 0.02, so 0.05 allows one or
#:   two near-tie swaps.
#: * ``fp16``: 11 significand bits (unit roundoff 2^-11 ≈ 4.9e-4), 8× finer than bf16: 1e-2 and 0.03.
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(score=1e-4, map=1e-4, metric=1e-3),
    "fp16": Tolerance(score=1e-2, map=1e-2, metric=0.03),
    "bf16": Tolerance(score=5e-2, map=5e-2, metric=0.05),
}


def tolerance_for(reference_precision: str, target_precision: str) -> Tolerance:
    """The looser tolerance of the two precisions (comparing fp32 with bf16 is as loose as bf16)."""
    both = [TOLERANCES[check_precision(p)] for p in (reference_precision, target_precision)]
    return max(both, key=lambda t: t.score)


@dataclass
class Agreement:
    """How the target's outputs compare with the reference's.

    Attributes:
        score_error: Scaled max error of the image scores (see :class:`Tolerance`); inf when not comparable.
        map_error: Scaled max error of the anomaly maps; inf when not comparable.
        metric_errors: Absolute difference per metric (0 when both are NaN, inf when only one is).
        tolerance: The tolerance it was judged by.
        problems: One line per check that failed; empty when the sides agree.
    """

    score_error: float
    map_error: float
    metric_errors: dict[str, float]
    tolerance: Tolerance
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every check passed."""
        return not self.problems


def scaled_error(reference: np.ndarray, target: np.ndarray) -> float:
    """``max |target − reference| / max |reference|``; inf for other shapes or NaN/inf where the other is finite.

    Non-finite values at the same places with the same value (e.g. a NaN score on both sides) count as equal.
    """
    reference, target = np.asarray(reference, np.float64), np.asarray(target, np.float64)
    if reference.shape != target.shape:
        return math.inf
    same = (reference == target) | (np.isnan(reference) & np.isnan(target))
    finite = np.isfinite(reference) & np.isfinite(target)
    if not np.all(same | finite):
        return math.inf
    if not finite.any():
        return 0.0
    difference = float(np.max(np.abs(target[finite] - reference[finite])))
    scale = float(np.max(np.abs(reference[finite])))
    if difference == 0.0:
        return 0.0
    return difference / scale if scale > 0 else math.inf


def _metric_error(reference: float | None, target: float | None) -> float:
    ref = math.nan if reference is None else float(reference)
    tgt = math.nan if target is None else float(target)
    if math.isnan(ref) and math.isnan(tgt):
        return 0.0
    if math.isnan(ref) or math.isnan(tgt):
        return math.inf
    return abs(tgt - ref)


def compare_outputs(
    reference: dict[str, Any], target: dict[str, Any], tolerance: Tolerance, *, stems_checked: bool = True
) -> Agreement:
    """Compare two sides' per-sample scores, maps and metrics.

    Args:
        reference: ``scores`` (N,), ``maps`` (N, S, S) and ``metrics`` (name → value) of the reference side,
            and ``stems`` (N,) naming the samples in order.
        target: The same for the target side.
        tolerance: The limits (see :func:`tolerance_for`).
        stems_checked: Check that both sides scored the same samples in the same order.

    Returns:
        The errors and one problem line per failed check.
    """
    problems: list[str] = []
    if stems_checked and list(reference["stems"]) != list(target["stems"]):
        problems.append("the sides scored different samples (or in another order)")
    score_error = scaled_error(reference["scores"], target["scores"])
    map_error = scaled_error(reference["maps"], target["maps"])
    if not score_error <= tolerance.score:
        problems.append(f"image scores differ by {score_error:.3g} of their scale (tolerance {tolerance.score:g})")
    if not map_error <= tolerance.map:
        problems.append(f"anomaly maps differ by {map_error:.3g} of their scale (tolerance {tolerance.map:g})")
    metric_errors = {}
    for name in METRICS:
        ref, tgt = reference["metrics"].get(name), target["metrics"].get(name)
        metric_errors[name] = error = _metric_error(ref, tgt)
        if not error <= tolerance.metric:
            problems.append(f"{name} {_fmt(ref)} vs {_fmt(tgt)} (tolerance {tolerance.metric:g})")
    return Agreement(score_error, map_error, metric_errors, tolerance, problems)


# ----------------------------------------------------------------------------------------------- the child side
def run_side(spec: dict[str, Any]) -> dict[str, Any]:
    """Train and test one method on one (device, precision) in this process; arrays go to ``spec['arrays']``.

    Returns:
        Metrics, timings (test samples per second, feature extraction included: the test features are not
        cached yet), peak GPU memory of the test (``torch.cuda.max_memory_allocated``, None off CUDA) and the
        process's peak RSS.
    """
    import torch

    from mmiad.data.mvtec3d import list_records
    from mmiad.engine.evaluation import evaluate_predictions
    from mmiad.engine.trained import build_model
    from mmiad.methods.registry import get_method
    from mmiad.utils.compute import describe_device, resolve_device, synchronize
    from mmiad.utils.memory import own_peak_rss_mb

    device = resolve_device(spec["device"])
    if spec["precision"] == "fp32":  # fp32 means IEEE fp32: TF32 products would differ from the CPU by ~1e-3
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(spec["seed"])
    hparams = {
        **get_method(spec["method"]).tiny_hparams,
        "extractors": spec["extractors"],
        "device": spec["device"],
        "precision": spec["precision"],
    }
    if spec["extractors"] != "weightfree":
        hparams["random_init"] = True
    train = list_records(spec["data"], spec["category"], "train")
    test = list_records(spec["data"], spec["category"], "test")
    with tempfile.TemporaryDirectory() as cache, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-weights warning is the point here
        model = build_model(spec["method"], cache, hparams)
        started = time.perf_counter()
        model.fit(train)
        synchronize(device)
        fit_seconds = time.perf_counter() - started
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        predictions = list(model.predict(test))
        synchronize(device)
        test_seconds = time.perf_counter() - started
    gpu_peak = torch.cuda.max_memory_allocated(device) / MB if device.type == "cuda" else None
    metrics = evaluate_predictions(predictions)
    np.savez(
        spec["arrays"],
        scores=np.array([p.pred_score for p in predictions], np.float64),
        maps=np.stack([np.asarray(p.anomaly_map, np.float32) for p in predictions]),
        stems=np.array([f"{p.record.defect_type}/{p.record.stem}" for p in predictions]),
    )
    return {
        "spec": spec,
        "device_name": describe_device(device),
        "metrics": {name: float(metrics[name]) for name in METRICS},
        "fit_s": fit_seconds,
        "test_s": test_seconds,
        "samples_per_s": len(predictions) / test_seconds,
        "gpu_peak_mb": gpu_peak,
        "rss_peak_mb": own_peak_rss_mb(),
    }


def measure_side(spec: dict[str, Any]) -> dict[str, Any]:
    """Run :func:`run_side` in a fresh child process; its result, or ``{"error": last stderr line}``."""
    command = [sys.executable, "-m", "mmiad.bench", "gpu-worker", json.dumps(spec)]
    child = subprocess.run(command, capture_output=True, text=True, check=False)
    if child.returncode != 0:
        return {"spec": spec, "error": (child.stderr.strip().splitlines() or [f"exit {child.returncode}"])[-1]}
    result: dict[str, Any] = json.loads(child.stdout.strip().splitlines()[-1])
    with np.load(spec["arrays"]) as arrays:
        result.update(scores=arrays["scores"], maps=arrays["maps"], stems=arrays["stems"].tolist())
    return result


def _worker_command(args: argparse.Namespace) -> int:
    print(json.dumps(run_side(json.loads(args.spec))))
    return 0


# ---------------------------------------------------------------------------------------------- the parent side
@dataclass
class Pair:
    """One method and preset on both sides, and whether they agree (``agreement`` None when a side failed)."""

    method: str
    extractors: str
    reference: dict[str, Any]
    target: dict[str, Any]
    agreement: Agreement | None

    @property
    def ok(self) -> bool:
        """Both sides ran and agree."""
        return self.agreement is not None and self.agreement.ok

    def problems(self) -> list[str]:
        """Why the pair fails (empty when it passes)."""
        failed = [f"{name} failed: {side['error']}" for name, side in self._sides() if "error" in side]
        return failed or (self.agreement.problems if self.agreement is not None else [])

    def _sides(self) -> tuple[tuple[str, dict[str, Any]], ...]:
        return ("reference", self.reference), ("target", self.target)


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}"


def _side_name(spec: dict[str, Any]) -> str:
    return f"{spec['device']} {spec['precision']}"


def table(pairs: list[Pair]) -> str:
    """The seeds' Tab. 5 form: metrics, samples/s, peak GPU memory and peak RSS of each side, and the agreement."""
    lines = [
        "| method | extractors | side | I-AUROC | P-AUROC | AUPRO@30% | AUPRO@1% | samples/s | peak GPU MB | "
        "peak RSS MB | score Δ | map Δ | agrees |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for pair in pairs:
        for role, side in pair._sides():
            head = f"| {pair.method} | {pair.extractors} | {role}: {_side_name(side['spec'])} |"
            if "error" in side:
                lines.append(f"{head} error: {side['error'].replace('|', '/')} ||||||||| **no** |")
                continue
            metrics = side["metrics"]
            cells = [_fmt(metrics[name]) for name in METRICS]
            cells += [f"{side['samples_per_s']:.2f}", _fmt(side["gpu_peak_mb"], 0), f"{side['rss_peak_mb']:.0f}"]
            if role == "target" and pair.agreement is not None:
                cells += [f"{pair.agreement.score_error:.1e}", f"{pair.agreement.map_error:.1e}"]
            else:
                cells += ["—", "—"]
            verdict = ("yes" if pair.ok else "**no**") if role == "target" else ""
            lines.append(f"{head} " + " | ".join(cells) + f" | {verdict} |")
    return "\n".join(lines)


def run_pairs(
    data: Path,
    work: Path,
    methods: list[str],
    presets: list[str],
    reference: tuple[str, str],
    target: tuple[str, str],
    *,
    category: str,
    seed: int,
) -> list[Pair]:
    """Every (method, preset) on the reference and the target, each side in its own child process."""
    from mmiad.methods.registry import get_method

    tolerance = tolerance_for(reference[1], target[1])
    pairs = []
    for method in methods:
        for preset in presets:
            # The deep preset is the method's paper backbone (its config says which), with random weights here.
            paper = getattr(get_method(method).config_class, "paper_extractors", "dino-pointmae")
            extractors = paper if preset == "deep" else preset
            sides = []
            for role, (device, precision) in (("reference", reference), ("target", target)):
                spec = {
                    "method": method,
                    "extractors": extractors,
                    "device": device,
                    "precision": precision,
                    "data": str(data),
                    "category": category,
                    "seed": seed,
                    "arrays": str(work / f"{method}-{extractors}-{role}.npz"),
                }
                print(f"{method} {extractors} {role} ({device} {precision}) ...", file=sys.stderr, flush=True)
                sides.append(measure_side(spec))
            agreement = None
            if not any("error" in side for side in sides):
                agreement = compare_outputs(sides[0], sides[1], tolerance)
            pairs.append(Pair(method, extractors, sides[0], sides[1], agreement))
    return pairs


def _gpu_command(args: argparse.Namespace) -> int:
    from mmiad.data.synthetic import generate_dataset
    from mmiad.methods.registry import available_methods

    reference = (check_device_name(args.reference_device), check_precision(args.reference_precision))
    target = (check_device_name(args.target_device), check_precision(args.target_precision))
    for role, (device, _) in (("reference", reference), ("target", target)):
        if not device_present(device):
            what = "CUDA is untested here" if device.startswith("cuda") else f"device {device!r} is untested here"
            print(
                f"{what}: the {role} device {device!r} is not present on this machine; nothing was run", file=sys.stderr
            )
            return EXIT_NO_DEVICE
    methods = args.methods.split(",") if args.methods else available_methods()
    unknown = sorted(set(methods) - set(available_methods()))
    if unknown:
        raise SystemExit(f"unknown method(s) {', '.join(unknown)}; available: {', '.join(available_methods())}")
    presets = args.presets.split(",")
    with tempfile.TemporaryDirectory(prefix="mmiad-bench-gpu-") as scratch:
        work = Path(args.work) if args.work else Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        data = generate_dataset(
            work / "data",
            preset="tiny",
            seed=args.seed,
            categories=[args.category],
            n_train=args.train,
            n_validation=1,
            n_test_good=args.test_good,
            n_per_defect=args.per_defect,
            overwrite=True,
        )
        pairs = run_pairs(data, work, methods, presets, reference, target, category=args.category, seed=args.seed)
    tolerance = tolerance_for(reference[1], target[1])
    failed = [pair for pair in pairs if not pair.ok]
    names = sorted({side["device_name"] for pair in pairs for _, side in pair._sides() if "device_name" in side})
    body = (
        f"### Reference {reference[0]} {reference[1]} vs target {target[0]} {target[1]}: every method, both presets\n\n"
        f"Command: `python -m mmiad.bench gpu --reference-device {reference[0]} --reference-precision {reference[1]} "
        f"--target-device {target[0]} --target-precision {target[1]}` — synthetic `tiny` category `{args.category}` "
        f"(64×64), {args.train} training images, {args.test_good} good + {args.per_defect} per defect test images; "
        "each method's `tiny_hparams`; deep presets with **random weights** (their metrics mean nothing). Each side "
        "trains and tests in a fresh process with an empty feature cache. samples/s = test samples per second, "
        "feature extraction included; peak GPU MB = `torch.cuda.max_memory_allocated` during the test; peak RSS = "
        "the process's `VmHWM` (training included). score Δ / map Δ = max |target − reference| / max |reference|; "
        "tolerance (of the lower precision): scores "
        f"{tolerance.score:g}, maps {tolerance.map:g}, metrics "
        f"{tolerance.metric:g} absolute. fp32 sides run with TF32 off.  \n"
        f"Machine: {machine_description()}; devices: {', '.join(names) or 'none ran'}; shared with other work "
        "(times are indicative).\n\n"
        + table(pairs)
        + "\n\n"
        + (f"**{len(failed)} of {len(pairs)} disagree.**" if failed else f"All {len(pairs)} agree.")
        + (f"\n\n{args.note}" if args.note else "")
    )
    if args.out:
        section = f"gpu-{reference[0]}-{reference[1]}-vs-{target[0]}-{target[1]}".replace(":", "")
        replace_section(Path(args.out), section, body)
    print(body)
    for pair in failed:
        for problem in pair.problems():
            print(f"DISAGREE {pair.method} {pair.extractors}: {problem}", file=sys.stderr)
    return EXIT_DISAGREE if failed else 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``gpu`` (and its ``gpu-worker``) to ``python -m mmiad.bench``."""
    parser = commands.add_parser("gpu", help="every method on a target device/precision vs a reference (CUDA vs CPU)")
    parser.add_argument("--reference-device", default="cpu")
    parser.add_argument("--reference-precision", default="fp32", choices=PRECISIONS)
    parser.add_argument("--target-device", default="cuda")
    parser.add_argument("--target-precision", default="fp32", choices=PRECISIONS)
    parser.add_argument("--methods", default=None, help="comma-separated (default: every registered method)")
    parser.add_argument("--presets", default="weightfree,deep", help="weightfree and/or deep (the method's backbone)")
    parser.add_argument("--category", default="puck")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=6, help="training images")
    parser.add_argument("--test-good", type=int, default=4, help="good test images")
    parser.add_argument("--per-defect", type=int, default=2, help="test images per defect type (4 types)")
    parser.add_argument("--out", default=None, help="update this markdown file (e.g. BENCHMARKS.md)")
    parser.add_argument("--note", default=None, help="a paragraph to add under the table (e.g. which code was run)")
    parser.add_argument("--work", default=None, help="keep the data and arrays here (default: a temporary folder)")
    parser.set_defaults(handler=_gpu_command)
    worker = commands.add_parser("gpu-worker", help="(internal) one side in a fresh process")
    worker.add_argument("spec")
    worker.set_defaults(handler=_worker_command)
