"""Helpers shared by the test files (pytest puts this folder on ``sys.path``: import them with
``from conftest import run_cli``)."""

from __future__ import annotations

import pytest
import torch

from normlab.cli import main


def run_cli(argv, capsys) -> tuple[int, str, str]:
    """``normlab ARGV`` in this process, through the console script's entry point (no
    ``normlab`` on PATH needed): ``(exit code, stdout, stderr)`` of this call alone."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


#: one torch thread for a test (``pytestmark = pytest.mark.usefixtures("one_thread")``):
#: small inputs, and the lab's runs are deterministic per thread count
one_thread = pytest.fixture(_single_thread, name="one_thread")
#: the same for a whole module
one_thread_module = pytest.fixture(_single_thread, name="one_thread_module", scope="module")
