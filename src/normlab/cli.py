"""The ``normlab`` command line.

Each tool contributes its sub-commands through a ``register(subparsers)`` function in its
own module (listed in ``COMMAND_MODULES``), so the lab, the diagnostics and the benchmarks
stay independent and this file stays small.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = (
    "normlab.lab.cli",          # compare, train, report, list
    "normlab.diagnostics.cli",  # inspect
    "normlab.bench",            # bench
)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="normlab",
        description="Normalization layers for deep networks: use, compare and understand them.",
    )
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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"normlab {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"normlab {args.command}: interrupted; finished results are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
