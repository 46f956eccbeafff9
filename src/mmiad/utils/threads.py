"""Running memory-bound tensor loops on one CPU thread.

Loops such as the greedy coreset and farthest point sampling issue thousands of small element-wise operations.
Each one is a parallel region whose threads must all be scheduled before it ends; on a 2-core machine shared with
other processes a region then waits for a scheduler time slice, and measured under such load the loops ran
10–60× slower with 2 threads than with 1. With the work memory-bound, the second core adds little even on an idle
machine, so these loops run single-threaded on the CPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def single_thread_on_cpu(device: torch.device | str) -> Iterator[None]:
    """Limit torch's intra-op threads to 1 inside the block when ``device`` is the CPU (else do nothing).

    The setting is process-wide while the block runs and is restored afterwards.
    """
    if torch.device(device).type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
