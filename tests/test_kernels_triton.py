"""The Triton kernels: interpreter cases (in their own pytest session), launch configurations.

``TRITON_INTERPRET=1`` must be set before triton is first imported, and other tests (e.g.
torch.compile) may already have imported it in this process, so the parametrized cases of
``tests/triton_cases.py`` run in a fresh pytest session in a subprocess; a failure reports
the failing case ids and their assertion messages.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed")

CASES = Path(__file__).with_name("triton_cases.py")


def test_triton_cases_in_interpreter(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(CASES), "-q", "-p", "no:cacheprovider",
         "-W", "ignore::RuntimeWarning", "--junitxml", str(tmp_path / "cases.xml"),
         "-o", "addopts="],
        env=env, capture_output=True, text=True, timeout=900, cwd=CASES.parent.parent)
    summary = proc.stdout.strip().splitlines()[-1:] if proc.stdout.strip() else []
    assert proc.returncode == 0, "\n".join(
        [ln for ln in proc.stdout.splitlines() if ln.startswith(("FAILED", "ERROR", "E "))][:60]
        + summary + [proc.stderr[-2000:]])
    assert " passed" in summary[0] and "skipped" not in summary[0], summary


@pytest.mark.parametrize("shape,channels_last", [((64, 64, 1024), False), ((64, 64, 1024), True),
                                                 ((256, 512, 1), False), ((3, 2, 5), False)])
def test_bn_launch_covers_every_row_once(shape, channels_last, monkeypatch):
    """The split configuration tiles the N·L rows of every channel exactly once, along the
    contiguous axis, within the register budget; NORMLAB_TRITON_BN_SPLIT forces the split."""
    import torch

    from normlab.kernels.triton_kernels import bn_launch

    n, c, l = shape
    x = torch.empty(n, c, l)
    if channels_last:
        x = torch.empty(n, l, c).transpose(1, 2)   # strides (L·C, 1, C): NHWC viewed as NCL
    monkeypatch.delenv("NORMLAB_TRITON_BN_SPLIT", raising=False)
    cfg = bn_launch(x)
    rows = n * l
    assert cfg.split * cfg.rows_per_program >= rows
    assert (cfg.split - 1) * cfg.rows_per_program < rows
    assert cfg.block_c * cfg.block_r <= 2048 and cfg.block_p >= 1
    assert (cfg.block_c > 1) == (x.stride(1) == 1 and c > 1)
    assert cfg.grid == (-(-c // cfg.block_c), cfg.split)
    monkeypatch.setenv("NORMLAB_TRITON_BN_SPLIT", "5")
    forced = bn_launch(x)
    assert forced.split == 5
    assert forced.split * forced.rows_per_program >= rows


@pytest.mark.parametrize("layout,expect", [
    ("gn", "RowsLaunch"), ("gn channels_last", "RowsLaunch"),
    ("in channels_last", "Rows1Launch"), ("ln", "RowsLaunch")])
def test_rows_launch_reads_along_the_contiguous_axis(layout, expect):
    """The rows kernels' tiles are long along the axis that is contiguous in memory, one-channel
    rows on channels_last take several rows per program, and the grid covers every row."""
    import torch

    from normlab.kernels import triton_kernels as TK
    from normlab.kernels.layout import plan

    x = torch.empty(2, 12, 6, 5)
    if "channels_last" in layout:
        x = x.contiguous(memory_format=torch.channels_last)
    if layout.startswith("gn"):
        xv, dims, p = x.view(2, 3, 4, 30), (2, 3), torch.empty(1, 3, 4, 1)
    elif layout.startswith("in"):
        xv, dims, p = x.view(2, 12, 1, 30), (2, 3), torch.empty(1, 12, 1, 1)
    else:
        xv, dims, p = x.reshape(24, 30), (1,), torch.empty(1, 30)
    view = TK._rows_view(xv, plan(xv, (p,), dims))
    cfg = TK.rows_launch(view)
    assert type(cfg).__name__ == expect
    if isinstance(cfg, TK.Rows1Launch):
        assert cfg.grid[0] * cfg.grid[1] * cfg.block_s >= view.rows and cfg.block_s > 1
    else:
        assert cfg.grid == (view.rows,)
        if view.stride_l == 1:    # positions contiguous: the whole row length in a tile
            assert cfg.block_l == TK._pow2(view.positions)
        else:                     # the group's channels contiguous (GN on channels_last)
            assert view.stride_c == 1 and cfg.block_j == TK._pow2(view.channels)
