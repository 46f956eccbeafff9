"""``python -m mmiad.bench memory``: peak memory of training, each configuration in a fresh child process.

Two kinds of runs, each in its own ``python -m mmiad.bench memory-worker SPEC`` child so its ``VmHWM`` (peak
resident memory of its own address space, :func:`mmiad.utils.memory.own_peak_rss_mb`) is its own:

* ``train``: ``mmiad.train`` of one method on the synthetic ``demo`` data (4 categories × ``n_train`` images),
  the way a user runs it: the whole process's peak, features, training and calibration included.
* ``step``: Uni-RCM's training loop alone on random grids of the weight-free channel counts, to compare the
  preflight's estimate (:mod:`mmiad.methods.unircm.memory`) with the measured peak and to time a step.

The machine is shared with other work (2 cores), so times are indicative; peaks do not depend on it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mmiad.bench.common import machine_description, replace_section
from mmiad.utils.memory import own_peak_rss_mb

MB = 2**20


def _current_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def run_step(spec: dict[str, Any]) -> dict[str, Any]:
    """Uni-RCM training steps on random grids; the estimate next to the measured peak (in the child)."""
    import torch

    from mmiad.methods.unircm.blocks import RefGuidedMapping
    from mmiad.methods.unircm.memory import plan_training
    from mmiad.methods.unircm.training import train_mappings

    torch.manual_seed(0)
    grid, c2, c3 = spec.get("grid", 56), spec.get("channels_2d", 42), spec.get("channels_3d", 33)
    images, batch = spec["images"], spec["batch"]
    store = {
        i: (torch.randn(grid * grid, c2), torch.randn(grid * grid, c3), torch.rand(grid * grid) < 0.6)
        for i in range(images)
    }
    shape = {"hidden": spec["hidden"], "grid": grid, "num_blocks": spec.get("blocks", 3)}
    networks = RefGuidedMapping(c2, c3, **shape), RefGuidedMapping(c3, c2, **shape)
    plan = plan_training(
        *networks,
        batch_size=batch,
        memory_budget_gb=spec.get("budget_gb", 1000.0),
        micro_batch=spec.get("micro"),
        checkpointing=spec.get("checkpointing"),
    )
    baseline = _current_rss_mb()
    started, cpu_started = time.perf_counter(), time.process_time()
    train_mappings(
        *networks,
        store,
        sorted(store),
        epochs=1,
        batch_size=batch,
        learning_rate=3e-4,
        mse_weight=0.01,
        mse_scale=(1.0, 1.0),
        seed=0,
        plan=plan,
        batch_norm=spec.get("batch_norm", "exact"),
        checkpointing=plan.checkpointing,
    )
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    return {
        "spec": spec,
        "micro": plan.micro_batch,
        "checkpointing": plan.checkpointing,
        "estimate_mb": plan.peak_bytes / MB,
        "baseline_mb": baseline,
        "peak_mb": own_peak_rss_mb(),
        "seconds_per_step": seconds / -(-images // batch),
        "cpu_seconds_per_step": cpu_seconds / -(-images // batch),
    }


def run_train(spec: dict[str, Any]) -> dict[str, Any]:
    """``mmiad.train`` of one method on the demo data (in the child)."""
    import mmiad

    started, cpu_started = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory() as out:
        mmiad.train(
            spec["data"],
            out,
            method=spec["method"],
            unified=spec.get("unified", False),
            categories=spec.get("categories"),
            cache_dir=str(Path(out) / "cache"),
            **spec.get("hparams", {}),
        )
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    return {"spec": spec, "seconds": seconds, "cpu_seconds": cpu_seconds, "peak_mb": own_peak_rss_mb()}


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Run ``spec`` in a fresh child process and return its result (or its error)."""
    command = [sys.executable, "-m", "mmiad.bench", "memory-worker", json.dumps(spec)]
    child = subprocess.run(command, capture_output=True, text=True, check=False)
    if child.returncode != 0:
        return {"spec": spec, "error": (child.stderr.strip().splitlines() or [f"exit {child.returncode}"])[-1]}
    return json.loads(child.stdout.strip().splitlines()[-1])


def _worker_command(args: argparse.Namespace) -> int:
    spec = json.loads(args.spec)
    result = run_step(spec) if spec["kind"] == "step" else run_train(spec)
    print(json.dumps(result))
    return 0


def step_table(results: list[dict[str, Any]]) -> str:
    """Estimate vs measured peak of Uni-RCM training steps, and time per step and per epoch."""
    lines = [
        "| hidden | images | batch | micro-batch | checkpointing | estimate + baseline (MB) | measured VmHWM (MB) | "
        "estimate / measured | wall s per step | CPU s per step | wall s per epoch |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        spec = r["spec"]
        head = f"| {spec['hidden']} | {spec['images']} | {spec['batch']} |"
        if "error" in r:
            lines.append(f"{head} {spec.get('micro')} | | error: {r['error']} |||||")
            continue
        predicted = _estimate_mb(spec) + r["baseline_mb"]
        steps = -(-spec["images"] // spec["batch"])
        lines.append(
            f"{head} {r['micro']} | {'yes' if r['checkpointing'] else 'no'} | {predicted:.0f} | {r['peak_mb']:.0f} | "
            f"{predicted / r['peak_mb']:.2f} | {r['seconds_per_step']:.1f} | {_cpu(r, 'cpu_seconds_per_step')} | "
            f"{r['seconds_per_step'] * steps:.0f} |"
        )
    return "\n".join(lines)


def _estimate_mb(spec: dict[str, Any]) -> float:
    """The current estimator's peak for a step spec (so a table rendered from an older log stays consistent)."""
    from mmiad.methods.unircm.blocks import RefGuidedMapping
    from mmiad.methods.unircm.memory import step_cost

    grid, c2, c3 = spec.get("grid", 56), spec.get("channels_2d", 42), spec.get("channels_3d", 33)
    shape = {"hidden": spec["hidden"], "grid": grid, "num_blocks": spec.get("blocks", 3)}
    networks = RefGuidedMapping(c2, c3, **shape), RefGuidedMapping(c3, c2, **shape)
    cost = step_cost(*networks, checkpointing=bool(spec.get("checkpointing")))
    return (cost.fixed_bytes + spec.get("micro", spec["batch"]) * cost.per_image_bytes) / MB


def _cpu(result: dict[str, Any], key: str) -> str:
    return f"{result[key]:.1f}" if key in result else "not recorded"


def train_table(results: list[dict[str, Any]]) -> str:
    """Peak memory and time of ``mmiad.train`` runs."""
    lines = ["| method | settings | peak VmHWM (MB) | wall time (s) | CPU time (s) |", "|---|---|---|---|---|"]
    for r in results:
        spec = r["spec"]
        settings = ", ".join(f"{k}={v}" for k, v in spec.get("hparams", {}).items()) or "defaults"
        if spec.get("categories"):
            settings = f"categories={'+'.join(spec['categories'])}, {settings}"
        if spec.get("unified"):
            settings = f"unified, {settings}"
        if "error" in r:
            lines.append(f"| {spec['method']} | {settings} | error: {r['error']} | |")
        else:
            cpu = _cpu(r, "cpu_seconds")
            lines.append(f"| {spec['method']} | {settings} | {r['peak_mb']:.0f} | {r['seconds']:.0f} | {cpu} |")
    return "\n".join(lines)


def _memory_command(args: argparse.Namespace) -> int:
    if args.results:  # render tables from the JSON lines of an earlier run
        results = [json.loads(line) for line in Path(args.results).read_text().splitlines() if line.startswith("{")]
    else:
        results = []
        for spec in json.loads(Path(args.specs).read_text()) if args.specs else _default_step_specs():
            result = measure(spec)
            print(json.dumps(result), file=sys.stderr, flush=True)
            results.append(result)
    steps = [r for r in results if r["spec"]["kind"] == "step"]
    trains = [r for r in results if r["spec"]["kind"] == "train"]
    body = (
        f"Command: `python -m mmiad.bench memory --specs SPECS.json`  \nMachine: {machine_description()}, "
        f"1-minute load average {os.getloadavg()[0]:.1f} at the end (above the 2 cores, other work shared them "
        "and times are inflated); peaks do not depend on the load.\n\n"
        "#### `mmiad.train` on the synthetic `demo` data (one category, 20 training images)\n\n"
        + train_table(trains)
        + "\n\n#### Uni-RCM training steps: the preflight's estimate vs the measured peak\n\n"
        "Random grids with the weight-free channels (42 + 33) on the 56×56 grid, 3 blocks, one epoch of "
        "`images` images; `baseline` is the child's resident memory before training (interpreter, torch, the "
        "grids).\n\n" + step_table(steps)
    )
    if args.out:
        replace_section(Path(args.out), "memory", body)
    print(body)
    return 0


def _default_step_specs() -> list[dict[str, Any]]:
    return [
        {"kind": "step", "hidden": hidden, "batch": batch, "micro": micro, "images": batch}
        for hidden, batch, micro in ((64, 4, 4), (128, 4, 2), (128, 4, 4), (256, 4, 4), (512, 2, 1), (512, 2, 2))
    ]


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``memory`` (and its ``memory-worker``) to ``python -m mmiad.bench``."""
    memory = commands.add_parser("memory", help="peak memory of training vs the preflight's estimate")
    memory.add_argument("--out", default=None, help="update this markdown file (e.g. BENCHMARKS.md)")
    memory.add_argument("--specs", default=None, help="JSON list of run specifications (default: a step sweep)")
    memory.add_argument("--results", default=None, help="render the tables from this log of JSON result lines")
    memory.set_defaults(handler=_memory_command)
    worker = commands.add_parser("memory-worker", help="(internal) one run in a fresh process")
    worker.add_argument("spec")
    worker.set_defaults(handler=_worker_command)
