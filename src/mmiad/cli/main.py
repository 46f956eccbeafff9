"""``mmiad`` command line: one sub-command per job, thin wrappers around the library.

Every command ends in one of the statuses of :mod:`mmiad.cli.common` (``EXIT_*``). A failure is one line on stderr
that names the file or option and the problem: a bad command line (argparse's checks, and a hyperparameter that
is unknown, mistyped, out of range or not applicable: :class:`HparamError`) exits 2; a bad input
(:class:`DataError`, :class:`ModelFileError`, a bad option value, an unreadable or unwritable file, a training
that diverges) exits 1; anything else is a bug in mmiad and exits 4. Tracebacks are shown only with ``--debug`` or
``MMIAD_DEBUG=1``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from mmiad import __version__
from mmiad.cli import data_commands, export_command, import_command, model_commands, report_command
from mmiad.cli.common import EXIT_ERROR, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_USAGE
from mmiad.cli.options import method_hint
from mmiad.data.errors import DataError
from mmiad.methods.hparams import HparamError
from mmiad.methods.modelfile import ModelFileError, one_line

DEBUG_ENV = "MMIAD_DEBUG"
# Errors that describe the user's input (files, options, disk): exit 1 with their message. A diverging training
# (FloatingPointError: a non-finite loss) comes from the settings or the data, and its message says what to try.
_INPUT_ERRORS = (DataError, ModelFileError, ValueError, OSError, MemoryError, FloatingPointError)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The full parser (exposed for tests and docs); ``argv`` only chooses whose hyperparameters ``--help`` shows
    (the ``--method`` it names; every method's options parse either way)."""
    parser = argparse.ArgumentParser(
        prog="mmiad",
        description="Unsupervised multimodal (RGB + 3D point cloud) industrial anomaly detection.",
    )
    parser.add_argument("--version", action="version", version=f"mmiad {__version__}")
    parser.add_argument("--debug", action="store_true", help=f"show tracebacks (also: {DEBUG_ENV}=1)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    data_commands.register(commands)
    method = method_hint(argv)
    model_commands.register(commands, method=method)
    export_command.register(commands)
    report_command.register(commands)
    import_command.register(commands, method=method)
    for command in commands.choices.values():  # `mmiad predict ... --debug` works as well as `mmiad --debug ...`
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def _debugging(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mmiad`` script: run one command and turn any failure into one line and a status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except HparamError as error:  # a usage error found once the method is known: exit 2, as argparse's
        if _debugging(args):
            raise
        print(f"mmiad {args.command}: error: {one_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    except _INPUT_ERRORS as error:
        if _debugging(args):
            raise
        message = "out of memory" if isinstance(error, MemoryError) else one_line(error)
        print(f"mmiad {args.command}: error: {message}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as error:
        if _debugging(args):
            raise
        print(
            f"mmiad {args.command}: internal error: {type(error).__name__}: {one_line(error)} "
            f"(a bug in mmiad; rerun with --debug or {DEBUG_ENV}=1 for the traceback and report it)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
