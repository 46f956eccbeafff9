"""``python -m mmiad.bench glfm-memory``: peak RAM of building one GLFM local memory, in RAM vs spilled to disk.

GLFM's official multi-class memories hold ~2.7 M × 768 local features before their 10 % coreset (8.35 GB in
float32). mmiad stores each cloud's features as one block of a :class:`~mmiad.methods.memorybank.bank.PatchStore`
(RAM up to ``memory_budget_gb``, then memory-mapped ``.npy`` spill files) and builds the memory with
:func:`~mmiad.methods.glfm.banks.coreset_bank`, which reads the blocks one at a time for the coreset's float16
random projection and gathers only the kept rows. This benchmark builds one memory from random clouds of
``--groups`` local features, once per budget, each in a fresh subprocess so that the peaks (``ru_maxrss``) do not
mix, and reports wall time and peak RSS next to the sizes the design predicts.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mmiad.bench.common import machine_description, replace_section


def _build(rows: int, dim: int, groups: int, fraction: float, budget_gb: float, float16: bool) -> dict[str, float]:
    """Build one memory in this process; returns seconds, the process's peak RSS (MiB) and whether it spilled."""
    import torch

    from mmiad.methods.glfm.banks import coreset_bank
    from mmiad.methods.memorybank.bank import PatchStore

    generator = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="mmiad-glfm-memory-") as spill:
        store = PatchStore(budget_gb * 2**30, spill, torch.float16 if float16 else torch.float32)
        started = time.perf_counter()
        for start in range(0, rows, groups):
            store.append(torch.randn(min(groups, rows - start), dim, generator=generator))
        collected = time.perf_counter()
        bank = coreset_bank(store.chunks, fraction, eps=0.9, seed=0, device=torch.device("cpu"))
        finished = time.perf_counter()
        spilled = store.spilled
        store.close()
    return {
        "collect_s": collected - started,
        "coreset_s": finished - collected,
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "spilled": float(spilled),
        "kept_rows": float(bank.shape[0]),
    }


def _measure(args: argparse.Namespace, budget_gb: float) -> dict[str, float]:
    """:func:`_build` in a fresh interpreter (its own peak)."""
    code = (
        "import json, sys; from mmiad.bench.glfm_memory import _build; "
        f"print(json.dumps(_build({args.rows}, {args.dim}, {args.groups}, {args.fraction}, {budget_gb}, "
        f"{args.float16})))"
    )
    output = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return dict(json.loads(output.strip().splitlines()[-1]))


def _command(args: argparse.Namespace) -> int:
    width, dtype = (2, "float16") if args.float16 else (4, "float32")
    store_mib = args.rows * args.dim * width / 2**20
    rows = []
    for budget in args.budgets:
        result = _measure(args, budget)
        rows.append(
            f"| {budget:g} | {'yes' if result['spilled'] else 'no'} | {result['collect_s']:.1f} | "
            f"{result['coreset_s']:.1f} | {result['peak_mib']:.0f} |"
        )
        print(rows[-1], flush=True)
    body = "\n".join(
        [
            f"One memory of {args.rows:,} random local features × {args.dim} ({dtype} store: {store_mib:,.0f} MiB), "
            f"clouds of {args.groups} features, coreset to {args.fraction:g} "
            f"({int(args.fraction * args.rows):,} rows kept), each budget in a fresh process.",
            "",
            f"Machine: {machine_description()}",
            "",
            "| `memory_budget_gb` | spilled | collect s | coreset s | peak RSS MiB |",
            "|---|---|---|---|---|",
            *rows,
            "",
            f"Command: `python -m mmiad.bench glfm-memory --rows {args.rows} --dim {args.dim} --groups {args.groups} "
            f"--fraction {args.fraction} --budgets {' '.join(f'{b:g}' for b in args.budgets)}"
            f"{' --float16' if args.float16 else ''}`",
        ]
    )
    print(body)
    if args.out:
        replace_section(Path(args.out), "glfm-memory", body)
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``glfm-memory`` to ``python -m mmiad.bench``."""
    parser = commands.add_parser("glfm-memory", help="peak RAM of one GLFM local memory, in RAM vs spilled")
    parser.add_argument("--out", default="", help="markdown file whose glfm-memory section is replaced")
    parser.add_argument("--rows", type=int, default=200_000, help="local features before the coreset")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--groups", type=int, default=1024, help="local features per cloud (one store block)")
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--budgets", type=float, nargs="+", default=[4.0, 0.0], help="memory_budget_gb values")
    parser.add_argument("--float16", action="store_true", help="store_float16 (half the store)")
    parser.set_defaults(handler=_command)
