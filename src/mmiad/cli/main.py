"""``mmiad`` command line: one sub-command per job, thin wrappers around the library.

Errors that come from the user's input (a bad file, a missing weights file, an unknown option value) are printed
as one clear line and exit with status 1; a traceback means a bug in mmiad.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mmiad import __version__
from mmiad.cli import data_commands, export_command, import_command, model_commands, report_command
from mmiad.data.errors import DataError
from mmiad.methods.modelfile import ModelFileError


def build_parser() -> argparse.ArgumentParser:
    """The full parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(
        prog="mmiad",
        description="Unsupervised multimodal (RGB + 3D point cloud) industrial anomaly detection.",
    )
    parser.add_argument("--version", action="version", version=f"mmiad {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    data_commands.register(commands)
    model_commands.register(commands)
    export_command.register(commands)
    report_command.register(commands)
    import_command.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mmiad`` script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except (DataError, ModelFileError, FileNotFoundError, ValueError) as error:
        print(f"mmiad {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
