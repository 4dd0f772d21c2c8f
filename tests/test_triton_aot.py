"""The Triton kernels compile for real GPUs — checked without one.

The interpreter the other Triton tests use never runs the GPU compiler; on the first GPU run
(H200, triton 3.6) the rows backward kernel failed in ``OptimizeThreadLocality``
(``loopResult.hasOneUse()``). Two guards:

* a structural rule, independent of the installed triton: no loop carries an accumulator
  fed by a reduction (the pattern that pass mishandles);
* an ahead-of-time compile of every launch configuration the helpers produce, for sm_80 and
  sm_90, through triton's own compiler and bundled ptxas (``normlab.kernels.triton_aot``).
  Set ``NORMLAB_TRITON_AOT_PYTHON`` to a Python with another triton (e.g. a venv with the GPU
  machine's version, no torch needed) to compile with that one.
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

SOURCE = Path(__file__).resolve().parent.parent / "src/normlab/kernels/_triton_source.py"

# the shape of the rows backward kernel that failed on the GPU (triton 3.6)
CRASHED = '''
import triton
import triton.language as tl

@triton.jit
def bwd(X, Y, n, m, B: tl.constexpr):
    sg = 0.0
    for j0 in range(0, m, B):
        c1 = tl.zeros((B,), tl.float32)
        for l0 in range(0, n, B):
            dy = tl.load(X + l0 + tl.arange(0, B)[:, None] * n + tl.arange(0, B)[None, :])
            c1 += tl.sum(dy, 1)
        tl.store(Y + j0 + tl.arange(0, B), c1)
        sg += tl.sum(c1, 0)
    tl.store(Y, sg)
'''


def test_no_loop_carries_an_accumulator_fed_by_a_reduction():
    from normlab.kernels.triton_aot import reduction_in_loop_violations

    assert reduction_in_loop_violations(SOURCE.read_text()) == []
    found = reduction_in_loop_violations(CRASHED)
    assert [ln.split("'")[1] for ln in found] == ["sg", "c1"], found


def test_launch_matrix_reaches_every_kernel_flag_and_dtype():
    """The recorded launches use every kernel, every value of every constexpr flag the
    launchers set, and float32, float16 and bfloat16 inputs."""
    from normlab.kernels import _triton_source, triton_aot

    records = triton_aot.launch_matrix()
    kernels = {k.fn.__name__ if hasattr(k, "fn") else k.__name__
               for k in _triton_source.KERNELS}
    assert {r["kernel"] for r in records} == kernels
    for name in kernels:
        mine = [r for r in records if r["kernel"] == name]
        flags = {k for k, v in mine[0]["args"].items() if isinstance(v, bool)}
        for flag in flags:
            assert {r["args"][flag] for r in mine} == {True, False}, (name, flag)
        if "ACT" in mine[0]["args"]:
            assert {r["args"]["ACT"] for r in mine} == {0, 1, 2}, name
        x = "X" if "X" in mine[0]["args"] else None
        if x:
            assert {r["args"]["X"]["tensor"] for r in mine} == {"float32", "float16",
                                                                "bfloat16"}, name
        assert any(r["core"] for r in mine), name


def test_every_kernel_compiles_for_sm80_and_sm90():
    from normlab.kernels.triton_aot import nvidia_backend_available

    other = os.environ.get("NORMLAB_TRITON_AOT_PYTHON")
    if not other:
        reason = nvidia_backend_available()
        if reason:
            pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "normlab.kernels.triton_aot", "--arch", "80,90"]
    if other:
        cmd += ["--python", other]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 3:
        pytest.skip(lines[-1] if lines else "no CUDA backend in triton")
    failures = [ln for ln in lines if ln.startswith("FAIL")]
    assert proc.returncode == 0 and not failures, "\n".join(failures[:20] + lines[-1:]
                                                            + [proc.stderr[-2000:]])
    assert lines[-1].startswith("AOT triton") and " 0 failed" in lines[-1], lines[-1:]
