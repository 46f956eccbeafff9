"""``python -m mmiad.bench COMMAND`` (stages, accuracy, fallback, orq, extend, incremental, glfm, glfm-memory,
compare, speed, memory, musc, fewshot, scoring)."""

from __future__ import annotations

import argparse
import sys

from mmiad.bench import (
    accuracy,
    comparison,
    fewshot,
    glfm,
    glfm_memory,
    gpu,
    incremental,
    memory,
    musc,
    scoring,
    speed,
    stages,
    unified,
)


def main(argv: list[str] | None = None) -> int:
    """Parse the sub-command and run it."""
    parser = argparse.ArgumentParser(prog="python -m mmiad.bench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    stages.register(commands)
    accuracy.register(commands)
    unified.register(commands)
    incremental.register(commands)
    glfm.register(commands)
    glfm_memory.register(commands)
    comparison.register(commands)
    speed.register(commands)
    memory.register(commands)
    gpu.register(commands)
    musc.register(commands)
    fewshot.register(commands)
    scoring.register(commands)
    args = parser.parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
