"""Peak resident memory of this process since it started its program."""

from __future__ import annotations

import resource
import sys
from pathlib import Path


def own_peak_rss_mb() -> float:
    """This process's peak resident set size in MiB, excluding the parent that spawned it.

    Benchmarks spawn a fresh child per run to measure its memory. ``ru_maxrss`` is the wrong number there on
    Linux: the kernel folds the pre-``exec`` copy of the parent into it, so a child of a 3 GB process reports
    3 GB however little it used. ``VmHWM`` in ``/proc/self/status`` belongs to the current address space only,
    so it starts afresh at ``exec``. Where there is no ``/proc`` (macOS) ``ru_maxrss`` is the fallback.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024.0  # bytes on macOS, KiB elsewhere
