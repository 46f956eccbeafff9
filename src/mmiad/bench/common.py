"""What every benchmark shares: describing the machine and updating a section of BENCHMARKS.md."""

from __future__ import annotations

import platform
from pathlib import Path

import torch


def machine_description() -> str:
    """CPU model, cores, memory, Python and torch versions: the context every number needs."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        memory_kb = next(int(x.split()[1]) for x in Path("/proc/meminfo").read_text().splitlines() if "MemTotal" in x)
        memory = f"{memory_kb / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration):
        memory = "unknown RAM"
    return (
        f"{cpu}, {torch.get_num_threads()} torch threads, {memory}, Python {platform.python_version()}, "
        f"torch {torch.__version__}"
    )


def replace_section(path: Path, name: str, body: str) -> None:
    """Replace (or append) the block between ``<!-- bench:name -->`` markers of a markdown file."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{start}\n{body.strip()}\n{end}"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        text = before + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
