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
    from normlab import kernels as K
    from normlab.kernels import reference_normalize_affine as ref

    def on_triton(*args, **kw):
        """The normlab::normalize_triton op (CPU tensors: Triton's interpreter)."""
        with K.use_backend("triton"):
            return K.normalize_affine_act(*args, **kw)

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
                y, st = on_triton(xx, w, b, dims, activation=act, tau=tau, kappa=kappa,
                              eps_extra=epsx, **kw)
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
    # batch norm with each channel's reduction split over several programs (uneven chunks)
    x2 = rnd(7, 9, 1) * 2 + 1
    x2[3, 4, 0] = 30.0
    for split in ("3", "7"):
        os.environ["NORMLAB_TRITON_BN_SPLIT"] = split
        results += [
            run(f"bn filtered split {split}", x, (w, b, None, None, None), (0, 2),
                threshold=2.0),
            run(f"bn keep-none split {split}", x, (w, b, None, None, None), (0, 2),
                threshold=0.01, gaussian_consistent=True),
            run(f"bn uncentered learned eps split {split}", x, (None, b, None, None,
                torch.tensor(1e-2)), (0, 2), centered=False),
            run(f"bn channels_last split {split}", xcl.reshape(4, 3, 30), (rnd(1, 3, 1),
                rnd(1, 3, 1), None, None, None), (0, 2), threshold=2.0),
            run(f"bn (N, C) split {split}", x2, (rnd(1, 9, 1), None, None, None, None),
                (0, 2), threshold=1.5),
        ]
    del os.environ["NORMLAB_TRITON_BN_SPLIT"]

    # one-channel rows on channels_last (FRN, IN): several rows per program, 40 channels
    # = two row blocks, the second partial
    x40 = rnd(3, 40, 3, 5).to(memory_format=torch.channels_last).reshape(3, 40, 1, 15)
    p40 = [rnd(1, 40, 1, 1) for _ in range(3)]
    xg = rnd(2, 12, 4, 5).to(memory_format=torch.channels_last).reshape(2, 3, 4, 20)
    results += [
        run("gn filtered channels_last (tiles along the group's channels)", xg,
            (rnd(1, 3, 4, 1), rnd(1, 3, 4, 1), None, None, None), (2, 3), threshold=1.5),
        run("frn affine-tlu learned eps channels_last 40", x40, (p40[0], p40[1], p40[2] * 0.3,
            p40[2].abs() * 0.4, torch.tensor(1e-3)), (2, 3), act="affine_tlu",
            centered=False, eps=1e-6),
        run("in filtered channels_last 40", x40, (p40[0], p40[1], None, None, None), (2, 3),
            threshold=1.5),
        run("in bfloat16 channels_last 40", x40.bfloat16(), (p40[0], p40[1], None, None,
            None), (2, 3), threshold=2.0),
    ]

    # running averages updated from the op's statistics vs the reference update
    from normlab.kernels import RunningStats, update_running_stats
    def running_case(name, xx, ww, bb, **kw):
        fused = RunningStats(torch.linspace(-1, 1, xx.shape[1]), torch.linspace(0.5, 2, xx.shape[1]), 0.3)
        expect = RunningStats(fused.mean.clone(), fused.var.clone(), 0.3)
        _, st = ref(xx.float(), ww, bb, (0, 2), **kw)
        update_running_stats(expect, st)
        on_triton(xx, ww, bb, (0, 2), running=fused, **kw)
        return name, max(((a - b).abs().max() / (1 + a.abs().max())).item()
                         for a, b in zip(expect[:2], fused[:2]))
    os.environ["NORMLAB_TRITON_BN_SPLIT"] = "3"
    results += [
        running_case("bn running stats filtered split 3", x, w, b, threshold=2.0),
        running_case("bn running stats channels_last", xcl.reshape(4, 3, 30), None, None),
        running_case("bn running stats float16", (x * 0.5).half(), w, b, threshold=2.0),
    ]
    del os.environ["NORMLAB_TRITON_BN_SPLIT"]

    # create_graph=True: first and second derivatives through the Triton op
    def second(name, fn_ref, fn_triton, inputs):
        outs = []
        for fn in (fn_ref, fn_triton):
            leaves = [leaf(t) for t in inputs]
            y = fn(*leaves)
            gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
            first = torch.autograd.grad(y, leaves, gy, create_graph=True)
            total = sum((g * torch.randn(g.shape, generator=torch.Generator().manual_seed(3)))
                        .sum() for g in first)
            again = torch.autograd.grad(total, leaves, allow_unused=True)
            outs.append([g.detach() for g in first]
                        + [torch.zeros(()) if g is None else g for g in again])
        return name, max(((a - b).abs().max() / (1 + a.abs().max())).item()
                         for a, b in zip(*outs))
    results += [
        second("bn filtered double backward",
               lambda x, w, b: ref(x, w, b, (0, 2), threshold=2.0)[0],
               lambda x, w, b: on_triton(x, w, b, (0, 2),
                                                              threshold=2.0)[0], (x, w, b)),
        second("frn tlu double backward",
               lambda x, w, t: F.tlu(ref(x, w, None, (2, 3), centered=False)[0], t),
               lambda x, w, t: on_triton(
                   x, w, None, (2, 3), activation="tlu", tau=t, centered=False)[0],
               (x4, w4, t4)),
    ]
    print("RESULTS " + json.dumps(results))
''')

TOLERANCE = {"in bfloat16 channels_last 40": 5e-2, "bn running stats float16": 2e-3, "bn float16": 2e-2, "gn bfloat16": 5e-2, "bn float16 params float32": 2e-2,
             "frn bfloat16 params float32": 5e-2}


def test_triton_kernels_match_reference_in_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS "))
    results = json.loads(line[len("RESULTS "):])
    assert len(results) == 32
    for name, err in results:
        assert err < TOLERANCE.get(name, 2e-5), (name, err)


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
    assert cfg.split * cfg.rows >= rows and (cfg.split - 1) * cfg.rows < rows
    assert cfg.block_c * cfg.block_r <= 2048 and cfg.block_p >= 1
    assert (cfg.block_c > 1) == (x.stride(1) == 1 and c > 1)
    monkeypatch.setenv("NORMLAB_TRITON_BN_SPLIT", "5")
    forced = bn_launch(x)
    assert forced.split == 5
    assert forced.split * forced.rows >= rows
