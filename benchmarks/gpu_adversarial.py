"""Adversarial inputs on the GPU path vs the float64 reference (module outputs, grads).

Usage: ``python benchmarks/gpu_adversarial.py`` (needs CUDA). Prints, per case, the max error
of the fused CUDA path on the non-outlier values relative to the float64 reference on CPU,
and of the float32 reference path on CUDA for comparison.
"""

import sys

import torch

import normlab
from normlab import kernels as K


def case(name, make, x, mask=None):
    def run(device, dtype, backend):
        torch.manual_seed(0)
        m = make().to(device=device, dtype=dtype).train()
        xx = x.to(device=device, dtype=dtype).detach().requires_grad_()
        with K.use_backend(backend):
            path = "?"
            y = m(xx)
            g = torch.ones_like(y)
            y.backward(g)
        return y.detach().double().cpu(), xx.grad.double().cpu()

    y64, g64 = run("cpu", torch.float64, "reference")
    out = []
    for backend in ("reference", "auto"):
        y, g = run("cuda", torch.float32, backend)
        sel = torch.ones_like(y64, dtype=torch.bool) if mask is None else mask
        sel = sel & torch.isfinite(y64)
        ey = (y - y64)[sel].abs().max().item() if sel.any() else float("nan")
        nan_ok = bool((torch.isnan(y) == torch.isnan(y64)).all())
        out.append(f"{backend}: y err {ey:.2e} nan-match {nan_ok}")
    print(f"{name:40s} " + " | ".join(out))


def main():
    assert torch.cuda.is_available()
    torch.manual_seed(0)
    x = torch.randn(16, 4, 16, 16, dtype=torch.float64)
    x[0, 0, 0, 0] = 1e6
    mask = x.abs() < 1e5
    case("fbn 1e6 outlier", lambda: normlab.FilteredBatchNorm2d(4), x, mask)
    case("fbn 1e6 outlier channels_last", lambda: normlab.FilteredBatchNorm2d(4),
         x.contiguous(memory_format=torch.channels_last), mask)
    x = torch.randn(4, 8, 8, 8, dtype=torch.float64)
    x[0, 0, 0, 0] = 1e4
    mask = x.abs() < 1e3
    case("fin 1e4 outlier", lambda: normlab.FilteredInstanceNorm2d(8), x, mask)
    case("fin 1e4 outlier channels_last", lambda: normlab.FilteredInstanceNorm2d(8),
         x.contiguous(memory_format=torch.channels_last), mask)
    x = torch.randn(4, 16, 8, 8, dtype=torch.float64)
    x[0, 0, 0, 0] = 1e5
    mask = x.abs() < 1e4
    case("fgn 1e5 outlier", lambda: normlab.FilteredGroupNorm(4, 16), x, mask)
    x = torch.randn(16, 4, 8, 8, dtype=torch.float64) * 0.01 + 1e6
    case("bn mean 1e6 sd 0.01", lambda: normlab.FilteredBatchNorm2d(4, threshold=None), x)
    case("fbn mean 1e6 sd 0.01", lambda: normlab.FilteredBatchNorm2d(4), x)
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    x[0, 0, 0, 0] = float("nan")
    case("frn NaN", lambda: normlab.FilterResponseNorm2d(4), x)
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    case("fbn thr 0.5 tiny sets", lambda: normlab.FilteredBatchNorm2d(3, threshold=0.5), x)
    return 0


if __name__ == "__main__":
    sys.exit(main())
