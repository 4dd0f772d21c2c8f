"""The ``normlab`` command line.

Each tool contributes its sub-commands through a ``register(subparsers)`` function in its
own module (listed in ``COMMAND_MODULES``), so the lab, the diagnostics and the benchmarks
stay independent and this file stays small.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

from ._checks import one_line, one_line_errors

COMMAND_MODULES = (
    "normlab.lab.cli",          # compare, train, report, list
    "normlab.diagnostics.cli",  # inspect
    "normlab.bench",            # bench
    "normlab.selftest",         # selftest
)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__  # lazy: start-up time: sub-commands load when the parser is built

    parser = one_line_errors(argparse.ArgumentParser(
        prog="normlab",
        description="Normalization layers for deep networks: use, compare and understand them.",
    ))
    parser.add_argument("--version", action="version", version=f"normlab {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name is not None and name.startswith(error.name):
                continue  # tool not built yet
            raise
        module.register(subparsers)
    for sub in subparsers.choices.values():
        one_line_errors(sub)
    parser.set_defaults(_commands=subparsers.choices)
    return parser


#: Errors caused by what the user gave (a value, a name, a path): exit code 2.
USAGE_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, IsADirectoryError,
                NotADirectoryError, PermissionError)
#: OSError numbers that mean "this path cannot be used" (also exit code 2).
_PATH_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EISDIR,
                errno.ENOTDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.ELOOP}


def describe_error(error: BaseException) -> str:
    """One line for ``error``: OSErrors as ``reason: 'path'``, others as their message."""
    if isinstance(error, OSError) and error.strerror and error.filename is not None:
        text = f"{error.strerror}: {str(error.filename)!r}"
        if error.filename2 is not None:
            text += f" -> {str(error.filename2)!r}"
    else:
        text = str(error) or type(error).__name__
    if isinstance(error, KeyError) and error.args:
        text = f"missing key {error.args[0]!r}"
    return one_line(text)


def exit_code(error: BaseException) -> int:
    """2 for bad input (values, names, unusable paths), 1 for everything else."""
    if isinstance(error, USAGE_ERRORS):
        return 2
    if isinstance(error, OSError) and error.errno in _PATH_ERRNOS:
        return 2
    return 1


def main(argv: list[str] | None = None) -> int:
    """Run ``normlab ARGV``. Every failure is one line on stderr
    (``normlab COMMAND: error: ...``) and a non-zero exit code: 2 for bad input (argument,
    name, value, path or file), 1 for the rest (a full disk, out of memory, a bug: the
    traceback is shown only with ``NORMLAB_TRACEBACK=1``), 130 for Ctrl-C."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # name the sub-command whose options were misspelled
        command = args._commands.get(getattr(args, "command", None), parser)
        command.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"normlab {args.command}: interrupted; finished results are kept", file=sys.stderr)
        return 130
    except (Exception, MemoryError) as error:  # noqa: BLE001 - the one place errors become lines
        if os.environ.get("NORMLAB_TRACEBACK"):
            raise
        code = exit_code(error)
        text = describe_error(error)
        if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
            text = f"out of memory ({text}); use smaller sizes"
        elif code == 1 and not isinstance(error, OSError):
            text = (f"internal error, please report it: {type(error).__name__}: {text} "
                    f"(NORMLAB_TRACEBACK=1 shows the traceback)")
        print(f"normlab {args.command}: error: {text}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
