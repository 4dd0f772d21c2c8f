"""GPU check of the kernel core (issue 11): the Triton custom ops under eager mode,
torch.compile (inductor must see the Triton kernels) and torch.export, and the first-use
check. Needs CUDA; prints one section per check and exits non-zero if one fails.

    python benchmarks/gpu_ops_check.py            # every check
    python benchmarks/gpu_ops_check.py --quick    # selftest on the plain case only
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
from torch import nn

import normlab
from normlab.kernels import check


def model(spec: str, device) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), normlab.create_norm_act(spec, 16),
                         nn.Conv2d(16, 8, 1)).to(device)


def step(module, run, x):
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y = run(x)
    y.square().mean().backward()
    return [y.detach(), x.grad] + [p.grad for p in module.parameters()]


def compile_and_export(spec: str, mode: str, device) -> list[str]:
    """Problems found (empty when the compiled and exported model equal eager)."""
    from torch._inductor.utils import run_and_get_code

    problems = []
    eager = model(spec, device).train(mode == "train")
    compiled_model = copy.deepcopy(eager)
    graphs = []

    def counting(gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx
        graphs.append(gm)
        return compile_fx(gm, example_inputs)

    compiled = torch.compile(compiled_model, backend=counting, fullgraph=True)
    x = torch.randn(8, 3, 16, 16, device=device)
    x[0, 0, 0, 0] = 30.0
    _, code = run_and_get_code(lambda: step(compiled_model, compiled, x))
    got, want = step(compiled_model, compiled, x), step(eager, eager, x)
    for i, (a, b) in enumerate(zip(got, want)):
        err = float((a - b).abs().max() / (1 + b.abs().max()))
        if err > 1e-3:
            problems.append(f"output/grad {i} differs by {err:.2e}")
    triton_names = ("bn_sums_kernel", "bn_apply_kernel", "fwd_kernel", "rows1_fwd_kernel")
    seen = [n for n in triton_names if any(n in c for c in code)]
    print(f"  {spec} {mode}: {len(graphs)} graph(s); normlab Triton kernels in inductor's code: "
          f"{seen or 'none'}")
    if len(graphs) != 1:
        problems.append(f"{len(graphs)} graphs")
    exported = torch.export.export(copy.deepcopy(eager), (x,)).module()
    err = float((exported(x) - eager(x)).abs().max())
    if err > 1e-3:
        problems.append(f"exported output differs by {err:.2e}")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 2
    import triton
    device = torch.device("cuda")
    print(f"# torch {torch.__version__}, triton {triton.__version__}, "
          f"{torch.cuda.get_device_name()}\n")
    failed = 0
    print("## normlab selftest --device cuda")
    from normlab.cli import main as cli
    failed += cli(["selftest", "--device", "cuda"] + (["--quick"] if args.quick else []))
    print("\n## torch.compile (inductor, fullgraph) and torch.export on CUDA")
    for spec in ("fbn", "frn"):
        for mode in ("train", "eval"):
            try:
                problems = compile_and_export(spec, mode, device)
            except Exception as error:  # noqa: BLE001 — report and go on
                problems = [f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"]
            for p in problems:
                print(f"  FAIL {spec} {mode}: {p}")
            failed += bool(problems)
    print("\n## first-use verdicts (path, family, dtype, layout, device) → passed")
    for key, verdict in check._verdicts.items():
        print(f"  {key}: {verdict}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
