"""Pictures and tables of the probes' records (:mod:`normlab.lab.probes`) for the report.

* ``percentiles.png`` — the BN paper's Fig. 1(b, c) (Ioffe & Szegedy 2015, arXiv 1502.03167):
  the 15th, 50th and 85th percentiles of the input of one sigmoid (unit 0 of the last
  hidden layer) over training, one panel per method, every seed (the first one bold);
* ``shape.png`` — skewness, excess kurtosis and fraction of zeros of ``Wu + b`` (solid) and
  ``u`` (dashed) per hidden layer over the evaluations, mean over seeds, one line per method.

Both are drawn from the run store alone (``RunResult.extra["probe"]``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .presets import Plan

__all__ = ["probe_plots", "probe_markdown"]


def _records(plan: Plan, runs, name: str) -> list[tuple[Any, list[tuple[int, dict]]]]:
    """``[(variant, [(seed, record), ...]), ...]`` for the variants whose runs hold probe
    ``name``, in plan order."""
    out = []
    for v in plan.variants:
        config_hash = v.config.config_hash()
        recs = sorted((r.seed, r.extra["probe"][name]) for r in runs
                      if r.config_hash == config_hash and name in r.extra.get("probe", {}))
        if recs:
            out.append((v, recs))
    return out


def _title(v) -> str:
    return f"{v.label} ({v.group})" if v.group else v.label


def _mean(values: list[float]) -> float:
    finite = [x for x in values if x == x]
    return sum(finite) / len(finite) if finite else math.nan


def _at(record: dict, key: str, fraction: float, unit: int = 0) -> float:
    steps = record["steps"]
    target = fraction * steps[-1]
    i = min(range(len(steps)), key=lambda j: abs(steps[j] - target))
    return record[key][i][unit]


def percentile_rows(plan: Plan, runs) -> list[dict[str, Any]]:
    """Per method: the mean over seeds of the 15/50/85th percentiles (unit 0) at the start,
    10 %, 50 % and the end of training, and the shift of the median from 10 % to the end in
    units of the final 15–85 spread, averaged over the recorded units and seeds."""
    rows = []
    for v, recs in _records(plan, runs, "percentiles"):
        row: dict[str, Any] = {"method": _title(v)}
        for frac in (0.0, 0.1, 0.5, 1.0):
            row[frac] = tuple(_mean([_at(r, f"p{q}", frac) for _, r in recs])
                              for q in (15, 50, 85))
        shifts = []
        for _, r in recs:
            for unit in range(len(r["p50"][0])):
                spread = _at(r, "p85", 1.0, unit) - _at(r, "p15", 1.0, unit)
                shift = abs(_at(r, "p50", 1.0, unit) - _at(r, "p50", 0.1, unit))
                shifts.append(shift / spread if spread > 0 else math.nan)
        row["shift"] = _mean(shifts)
        rows.append(row)
    return rows


def shape_rows(plan: Plan, runs) -> list[dict[str, Any]]:
    """Per method and hidden layer: mean over seeds of (skewness, excess kurtosis, zero
    fraction) of Wu + b and u at step 0, after the first evaluation and at the last."""
    rows = []
    for v, recs in _records(plan, runs, "shape"):
        layers = sorted(recs[0][1]["layers"], key=int)
        for layer in layers:
            row: dict[str, Any] = {"method": _title(v), "layer": int(layer)}
            for part in ("wub", "u"):
                for when, index in (("init", 0), ("first", 1), ("last", -1)):
                    entries = [r["layers"][layer][part] for _, r in recs]
                    entries = [e[index] for e in entries if len(e) > abs(index)
                               or (index == 0 and e)]
                    row[(part, when)] = tuple(_mean([e[k] for e in entries]) for k in
                                              ("skewness", "excess_kurtosis", "zero_fraction"))
            rows.append(row)
    return rows


def _triple(values: tuple[float, float, float], *, percent_last: bool = False) -> str:
    a, b, c = values
    if percent_last:
        return f"{a:.2f} / {b:.2f} / {100 * c:.0f} %"
    return f"{a:.2f} / {b:.2f} / {c:.2f}"


def save_figure(plt, fig, out: Path, name: str, written: dict[str, Path]) -> None:
    """Lay out ``fig``, write it to ``out/name`` (90 dpi), close it and record it in
    ``written`` — how every picture of the lab report is saved."""
    fig.tight_layout()
    fig.savefig(out / name, dpi=90)
    plt.close(fig)
    written[name] = out / name


def probe_markdown(plan: Plan, runs) -> list[str]:
    """Markdown sections for the probes present in the store (empty list if none)."""
    md: list[str] = []
    rows = percentile_rows(plan, runs)
    if rows:
        md += ["## Input of a sigmoid over training ([IS15] Fig. 1(b, c))", "",
               "15th / 50th / 85th percentiles of the input of unit 0 of the last hidden "
               "layer's nonlinearity over the probe images (mean over seeds), and how far the "
               "median moves from 10 % of training to the end, in units of the final "
               "15–85 spread (mean over the recorded units and seeds): ![](percentiles.png)",
               "", "| method | step 0 | 10 % | 50 % | end | median shift 10 % → end |",
               "|---|---:|---:|---:|---:|---:|"]
        for r in rows:
            md.append(f"| {r['method']} | " + " | ".join(_triple(r[f]) for f in
                                                        (0.0, 0.1, 0.5, 1.0))
                      + f" | {r['shift']:.2f} |")
        md.append("")
    rows = shape_rows(plan, runs)
    if rows:
        md += ["## Shape of Wu + b and u (the question of [IS15] §3.2)", "",
               "Per hidden layer, skewness / excess kurtosis / fraction of exact zeros, each "
               "per unit over the probe images (median over units; zeros: mean), mean over "
               "seeds — at initialization, after the first evaluation and at the last "
               "(a Gaussian has 0 / 0 / 0 %): ![](shape.png)", "",
               "| method | layer | Wu+b init | Wu+b first | Wu+b last | u init | u first | "
               "u last |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            md.append(f"| {r['method']} | {r['layer']} | " + " | ".join(
                _triple(r[(part, when)], percent_last=True) for part in ("wub", "u")
                for when in ("init", "first", "last")) + " |")
        md.append("")
    return md


def probe_plots(plan: Plan, runs, out: Path) -> dict[str, Path]:
    """Write ``percentiles.png`` and/or ``shape.png`` when the runs hold those probes."""
    written: dict[str, Path] = {}
    pct = _records(plan, runs, "percentiles")
    shape = _records(plan, runs, "shape")
    if not (pct or shape):
        return written
    import matplotlib  # lazy: optional dependency (matplotlib)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: optional dependency (matplotlib)

    if pct:
        fig, axes = plt.subplots(1, len(pct), figsize=(4.5 * len(pct), 3.6), squeeze=False,
                                 sharey=True)
        for ax, (v, recs) in zip(axes[0], pct):
            for i, (seed, r) in enumerate(recs):
                width, alpha = (1.6, 1.0) if i == 0 else (0.6, 0.35)
                for q, style in ((15, "--"), (50, "-"), (85, "--")):
                    ax.plot(r["steps"], [p[0] for p in r[f"p{q}"]], style, color="tab:blue",
                            lw=width, alpha=alpha, label=f"{q}th" if i == 0 else None)
            ax.set_title(f"{_title(v)}: input of a sigmoid", fontsize=9)
            ax.set_xlabel("training step")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel(f"unit 0 of hidden layer {pct[0][1][0][1].get('layer', '')}")
        axes[0][0].legend(fontsize=7, title="percentile (seed 1 bold)", title_fontsize=7)
        save_figure(plt, fig, out, "percentiles.png", written)

    if shape:
        layers = sorted(shape[0][1][0][1]["layers"], key=int)
        stats = (("skewness", "skewness"), ("excess_kurtosis", "excess kurtosis"),
                 ("zero_fraction", "fraction of zeros"))
        fig, axes = plt.subplots(len(stats), len(layers), figsize=(4.2 * len(layers), 8.5),
                                 squeeze=False)
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for vi, (v, recs) in enumerate(shape):
            color = colors[vi % len(colors)]
            for li, layer in enumerate(layers):
                for si, (key, name) in enumerate(stats):
                    ax = axes[si][li]
                    for part, style in (("wub", "-"), ("u", "--")):
                        series = [r["layers"][layer][part] for _, r in recs]
                        length = min(len(x) for x in series)
                        ys = [_mean([x[k][key] for x in series]) for k in range(length)]
                        ax.plot(recs[0][1]["epochs"][:length], ys, style, color=color,
                                marker="o", ms=2,
                                label=f"{_title(v)}: {'Wu+b' if part == 'wub' else 'u'}")
                    ax.set_title(f"hidden layer {layer}: {name}", fontsize=9)
                    ax.grid(alpha=0.3)
                    if si == len(stats) - 1:
                        ax.set_xlabel("evaluation (0 = initialization)")
        axes[0][0].legend(fontsize=6)
        save_figure(plt, fig, out, "shape.png", written)
    return written
