"""Check the Triton path on a real GPU against the reference backend (modules, fwd + bwd).

Usage: ``python benchmarks/gpu_check.py`` (needs CUDA and triton). Prints the max relative
error per (layer, dtype, layout) and exits non-zero if any exceeds its tolerance.
"""

import sys

import torch

import normlab
from normlab import kernels as K


def main() -> int:
    assert torch.cuda.is_available(), "no CUDA device"
    bad = 0
    for dtype, tol in ((torch.float32, 1e-4), (torch.float16, 2e-2), (torch.bfloat16, 6e-2)):
        for cl in (False, True):
            for name, make in (("fbn", lambda: normlab.FilteredBatchNorm2d(32)),
                               ("fgn", lambda: normlab.FilteredGroupNorm(8, 32)),
                               ("frn+tlu", lambda: normlab.FilterResponseNorm2d(32)),
                               ("frn+affine_tlu", lambda: normlab.FilterResponseNorm2d(32, activation="affine_tlu", learnable_eps=True))):
                x = torch.randn(8, 32, 12, 12, device="cuda") * 2 + 0.5
                x = x.to(dtype)
                if cl:
                    x = x.contiguous(memory_format=torch.channels_last)
                outs = []
                for backend in ("reference", "auto"):
                    torch.manual_seed(0)
                    m = make().cuda().to(dtype)
                    with torch.no_grad():
                        for p in m.parameters():
                            p.add_(torch.randn_like(p) * 0.1)
                    xx = x.clone().requires_grad_()
                    with K.use_backend(backend):
                        if backend == "auto":
                            path = K.selected_path(xx.reshape(8, 32, -1) if name == "fbn" else xx.reshape(8, 8 if name == "fgn" else 32, -1, 144), None, None, (0, 2) if name == "fbn" else (2, 3))
                        y = m(xx)
                        y.float().square().sum().backward()
                    outs.append([y.float(), xx.grad.float()] + [p.grad.float() for p in m.parameters()])
                err = max(((a - b).abs().max() / (1 + a.abs().max())).item() for a, b in zip(*outs))
                ok = err < tol
                bad += not ok
                print(f"{name:15s} {str(dtype):15s} channels_last={cl!s:5s} path={path:9s} rel.err={err:.2e} {'ok' if ok else 'FAIL'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
