"""Input checks shared by the command-line tools (``normlab compare | train | report |
inspect | bench``): argparse types that refuse 0, negative, NaN, inf and absurdly large
numbers with one line, devices, and output paths checked before any work starts.

Every check raises ``ValueError`` (or ``argparse.ArgumentTypeError`` inside argparse) with one
line naming the value and the fix; :func:`normlab.cli.main` prints it and exits with code 2.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path
from typing import Callable

__all__ = ["int_range", "float_range", "positive_float", "nonneg_float", "one_line_errors",
           "resolve_device", "check_out_dir", "check_output_file", "one_line"]


def int_range(low: int, high: int = 10**9) -> Callable[[str], int]:
    """argparse type: an integer in ``[low, high]``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        if value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high}, got {value}")
        return value

    parse.__name__ = "int"
    return parse


def float_range(low: float = 0.0, *, include_low: bool = False,
                high: float = math.inf) -> Callable[[str], float]:
    """argparse type: a finite number ``> low`` (``>= low`` with ``include_low``), ``<= high``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if value < low or (value == low and not include_low):
            raise argparse.ArgumentTypeError(f"must be {'>=' if include_low else '>'} {low:g}, "
                                             f"got {text}")
        if value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high:g}, got {text}")
        return value

    parse.__name__ = "float"
    return parse


positive_float = float_range(0.0)
nonneg_float = float_range(0.0, include_low=True)


def one_line(text: object) -> str:
    """``text`` on one line (newlines and runs of spaces become one space)."""
    return " ".join(str(text).split())


def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make argparse report a bad argument as one line (``normlab X: error: ...``), exit 2."""

    def error(message: str):
        parser.exit(2, f"{parser.prog}: error: {one_line(message)} "
                       f"(see `{parser.prog} --help`)\n")

    parser.error = error  # type: ignore[method-assign]
    return parser


def resolve_device(device=None):
    """``"auto"``/None → CUDA when available, else CPU; ``"cpu"``, ``"cuda"``, ``"cuda:N"``
    (N < the number of GPUs) and, where available, ``"mps"``; anything else is a
    ``ValueError`` naming the device and the valid choices."""
    import torch  # lazy: start-up time: argparse checks run before torch is needed

    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"invalid device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available; use "
                             f"--device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} "
                             f"CUDA device(s), cuda:0..cuda:{torch.cuda.device_count() - 1}")
        return dev
    if dev.type == "mps" and torch.backends.mps.is_available():
        return dev
    raise ValueError(f"device {device!r} is not supported here; use auto, cpu, cuda or cuda:N")


def _writable_dir(folder: Path, what: str) -> None:
    """Raise ``ValueError`` unless a file can be created in the existing folder ``folder``."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".normlab-probe-"):
            pass
    except OSError as error:
        raise ValueError(f"{what}: cannot write in {str(folder)!r} "
                         f"({error.strerror or error}); choose another path") from None


def _make_dir(folder: Path, what: str, shown: Path) -> None:
    """Create ``folder`` and its parents, or ``ValueError`` naming what is in the way."""
    probe = folder
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{what} {str(shown)!r}: {str(probe)!r} is a file, not a folder")
    if not folder.exists():
        _writable_dir(probe, what)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ValueError(f"{what}: cannot create {str(folder)!r} "
                             f"({error.strerror or error})") from None
    _writable_dir(folder, what)


def check_out_dir(path: str | os.PathLike, what: str = "--out") -> Path:
    """A folder to write into, checked before any work: not a file, no file on the way,
    writable. It is created (with its parents) here."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a file, not a folder; choose a folder")
    _make_dir(path, what, path)
    return path


def check_output_file(path: str | os.PathLike, what: str) -> Path:
    """A file to be written at the end of a long job, checked now: not a folder, its folder
    exists or can be created (it is created here) and is writable (a probe file is created
    and removed there)."""
    path = Path(path)
    if path.is_dir() or str(path).endswith(os.sep):
        raise ValueError(f"{what} {str(path)!r} is a folder; give a file path such as "
                         f"{str(path / 'model.pt')!r}")
    _make_dir(path.parent, what, path)
    return path
