"""``normlab selftest``: every fused kernel path against the reference, on this machine.

What to run after installing on a new machine (or GPU): for every fused path on the
selected devices (``cpu``: the C kernels; ``cuda``: the Triton kernels), every family (batch
norm, the rows family with TLU / affine TLU), dtype and memory layout, the forward and
backward results are compared with the exact (float64) reference on adversarial inputs —
planted outliers up to 1e6, sets that keep one value, ``|μ|/σ = 1e8``, NaN, Inf and an empty
batch (:mod:`normlab.kernels.check` states the rule). Prints one table row per
(path, layer, dtype, layout) with the worst normalized error per case; exits 1 if any check
fails, 0 otherwise (also when no fused path exists: the reference then serves every call).
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from normlab.kernels import check, cpu
from normlab.kernels.check import CASES

__all__ = ["register", "main", "format_table"]

DEVICES = ("cpu", "cuda")


def _devices(choice: str | None) -> list[str]:
    if choice is None:
        return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but torch.cuda.is_available() is False; "
                         "use --device cpu")
    return [choice]


def format_table(results) -> str:
    rows: dict[tuple, dict] = defaultdict(dict)
    for r in results:
        rows[r.path, r.layer, str(r.dtype).replace("torch.", ""), r.layout][r.case] = r
    cases = [c for c in CASES if any(c in cells for cells in rows.values())]
    lines = ["| path | layer | dtype | layout | " + " | ".join(cases) + " |",
             "|" + "---|" * (4 + len(cases))]
    for key, cells in rows.items():
        shown = []
        for case in cases:
            r = cells.get(case)
            if r is None:
                shown.append("-")
            elif r.message:
                shown.append("ERROR")
            elif r.passed:
                shown.append(f"{r.error:.0e}")
            else:
                shown.append(f"FAIL {r.error:.1e} > {r.allowed:.0e}")
        lines.append("| " + " | ".join([*key, *shown]) + " |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    cases = ("normal",) if args.quick else check.CASES
    failed = total = 0
    for device in _devices(args.device):
        paths = check.paths_on(device)
        if not paths:
            why = f" ({cpu.build_error()})" if device == "cpu" else ""
            print(f"# {device}: no fused kernel path{why}; the reference serves every call\n")
            continue
        results = check.run_selftest(device, cases=cases)
        total += len(results)
        bad = [r for r in results if not r.passed]
        failed += len(bad)
        print(f"# {device}: {', '.join(paths)} kernels vs the float64 reference; cells: worst "
              f"|error| / (1 + |exact|) (sums: / (1 + max |exact|))\n")
        print(format_table(results))
        for r in bad:
            if r.message:
                print(f"ERROR {r.path} {r.layer} {r.dtype} {r.layout} {r.case}: {r.message}")
        print()
    print(f"{total - failed} of {total} checks passed" if total else "nothing to check")
    return 1 if failed else 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "selftest", help="check every fused kernel path against the reference on this machine",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--device", choices=DEVICES, default=None,
                        help="cpu or cuda (default: every device present)")
    parser.add_argument("--quick", action="store_true",
                        help="only the plain case (no adversarial inputs)")
    parser.set_defaults(func=main)
