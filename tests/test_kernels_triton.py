"""Triton kernels against the analytic reference, run by Triton's CPU interpreter.

``TRITON_INTERPRET=1`` must be set before triton is first imported, and other tests (e.g.
torch.compile) may already have imported it in this process, so the checks run in a fresh
subprocess on tiny shapes and report the largest error per case.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed")

SCRIPT = textwrap.dedent(r'''
    import json, os
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import torch
    from normlab import functional as F
    from normlab.kernels import reference_normalize_affine as ref
    from normlab.kernels import triton_kernels as TK

    def leaf(t):
        return None if t is None else t.detach().clone().requires_grad_()

    def run(name, x, params, dims, act="none", **kw):
        outs = []
        for path in ("ref", "triton"):
            xx = leaf(x)
            w, b, tau, kappa, epsx = (leaf(p) for p in params)
            if path == "ref":
                y, st = ref(xx.float(), *(None if p is None else p.float() for p in (w, b)),
                            dims, eps_extra=epsx, **kw)
                if act == "tlu":
                    y = F.tlu(y, tau.float())
                if act == "affine_tlu":
                    y = F.affine_tlu(y, kappa.float(), tau.float())
            else:
                y, st = TK.fused_normalize_affine_act(xx, w, b, dims, activation=act, tau=tau,
                                                      kappa=kappa, eps_extra=epsx, **kw)
                assert y.dtype == x.dtype and y.stride() == x.stride()
            g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
            y.float().backward(g)
            grads = [xx.grad] + [p.grad for p in (w, b, tau, kappa, epsx) if p is not None]
            outs.append([y.float()] + [s.reshape(-1).float() for s in st]
                        + [t.float() for t in grads])
        err = max(((a.detach() - b.detach()).abs().max() / (1 + a.detach().abs().max())).item()
                  for a, b in zip(*outs))
        return name, err

    gen = torch.Generator().manual_seed(0)
    def rnd(*s):
        return torch.randn(*s, generator=gen)
    x = rnd(6, 5, 12) * 1.5 + 0.5
    x[0, 0, 0] = 20.0
    w, b = rnd(1, 5, 1), rnd(1, 5, 1)
    x4 = rnd(3, 4, 2, 10)
    w4, b4, t4, k4 = rnd(1, 4, 2, 1), rnd(1, 4, 2, 1), rnd(1, 4, 2, 1) * 0.3, rnd(1, 4, 2, 1).abs() * 0.4
    xcl = rnd(4, 3, 5, 6).to(memory_format=torch.channels_last)
    results = [
        run("bn filtered", x, (w, b, None, None, None), (0, 2), threshold=2.0),
        run("bn gaussian-consistent keep-none", x, (w, b, None, None, None), (0, 2),
            threshold=0.01, gaussian_consistent=True),
        run("bn uncentered", x, (None, b, None, None, None), (0, 2), centered=False),
        run("gn filtered", x4, (w4, b4, None, None, None), (2, 3), threshold=1.5),
        run("frn tlu learned eps", x4, (w4, b4, t4, None, torch.tensor(1e-3)), (2, 3),
            act="tlu", centered=False, eps=1e-6),
        run("frn affine-tlu filtered", x4, (w4, b4, t4, k4, None), (2, 3), act="affine_tlu",
            centered=False, threshold=1.5),
        run("ln rows", x4.reshape(6, 40), (rnd(1, 40), None, None, None, None), (1,),
            threshold=2.0),
        run("bn channels_last", xcl.reshape(4, 3, 30), (rnd(1, 3, 1), rnd(1, 3, 1), None, None,
            None), (0, 2), threshold=2.0),
        run("frn channels_last", xcl.reshape(4, 3, 1, 30), (rnd(1, 3, 1, 1), rnd(1, 3, 1, 1),
            rnd(1, 3, 1, 1), None, None), (2, 3), act="tlu", centered=False),
        run("bn float16", (x * 0.5).half(), (w.half(), b.half(), None, None, None), (0, 2),
            threshold=2.0),
        run("gn bfloat16", x4.bfloat16(), (w4.bfloat16(), b4.bfloat16(), None, None, None),
            (2, 3), threshold=2.0),
        # autocast/AMP: half activations, float32 parameters (dispatched on CUDA)
        run("bn float16 params float32", (x * 0.5).half(), (w, b, None, None, None), (0, 2),
            threshold=2.0),
        run("frn bfloat16 params float32", x4.bfloat16(), (w4, b4, t4, None, None), (2, 3),
            act="tlu", centered=False),
    ]
    print("RESULTS " + json.dumps(results))
''')

TOLERANCE = {"bn float16": 2e-2, "gn bfloat16": 5e-2, "bn float16 params float32": 2e-2,
             "frn bfloat16 params float32": 5e-2}


def test_triton_kernels_match_reference_in_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS "))
    results = json.loads(line[len("RESULTS "):])
    assert len(results) == 13
    for name, err in results:
        assert err < TOLERANCE.get(name, 2e-5), (name, err)
