"""Figures in the style of Horváth & Al-afandi 2020 [HA20] (matplotlib, Agg canvas; no
global backend change).

Every function takes plain data (dicts/rows as produced by the recorder and callbacks),
writes one PNG and returns its path. The numbers behind each figure are written as JSON/CSV
by the callers (:mod:`normlab.diagnostics.report`, the callbacks' ``write_artifacts``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = [
    "plot_layer_bands",
    "plot_channel_density",
    "plot_band_history",
    "plot_consistency",
    "plot_landscape",
    "plot_gradient_factor",
    "plot_distribution_shapes",
]

GOLD = "#d4a017"
RED = "#b22222"
DARK = "#5a0000"


def _figure(width: float, height: float):
    # lazy: optional dependency (matplotlib)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # lazy: optional dependency (matplotlib)

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    return path


def _by_layer(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        out.setdefault(row.get("layer", ""), []).append(row)
    return out


def plot_layer_bands(summary: dict[str, dict[str, Any]], path: str | Path, *,
                     title: str | None = None, sigma_lines: Sequence[float] = (7.0,),
                     yscale: str = "linear", annotate_k: float | None = 4.0) -> Path:
    """Per-layer distribution of ``x̂`` ([HA20] Fig. 1/2).

    Dashed: min and max; golden band: 1–99 %; red band: 25–75 %; dark line: median;
    dotted grey: ``±k`` for ``k`` in ``sigma_lines``. ``summary`` is
    :meth:`ActivationRecorder.summary` (layer name → dict with ``"bands"``). With
    ``annotate_k``, each layer is labelled with its excess kurtosis and its count of values
    beyond ``annotate_k``σ next to a unit Gaussian's expected count.
    """
    names = [n for n, s in summary.items() if s.get("bands")]
    if not names:
        raise ValueError("summary has no layer with bands; record some activations first")
    b = {k: np.array([summary[n]["bands"].get(k, np.nan) for n in names])
         for k in ("min", "q01", "q25", "q50", "q75", "q99", "max")}
    x = np.arange(len(names))
    fig = _figure(max(6.0, 0.5 * len(names) + 3), 4.5)
    ax = fig.add_subplot(1, 1, 1)
    ax.fill_between(x, b["q01"], b["q99"], color=GOLD, alpha=0.45, label="1–99 %", step=None)
    ax.fill_between(x, b["q25"], b["q75"], color=RED, alpha=0.85, label="25–75 %")
    ax.plot(x, b["q50"], color=DARK, lw=1.2, label="median")
    ax.plot(x, b["min"], "k--", lw=1.0, label="min / max")
    ax.plot(x, b["max"], "k--", lw=1.0)
    for k in sigma_lines:
        ax.axhline(k, color="grey", ls=":", lw=0.8)
        ax.axhline(-k, color="grey", ls=":", lw=0.8)
        ax.text(x[-1] + 0.1, k, f"+{k:g}σ", fontsize=7, color="grey", va="center")
        ax.text(x[-1] + 0.1, -k, f"−{k:g}σ", fontsize=7, color="grey", va="center")
    if annotate_k is not None:
        for i, n in enumerate(names):
            beyond = summary[n].get("beyond", {}).get(annotate_k)
            if beyond is None:
                continue
            ax.annotate(f"ex.kurt {summary[n]['excess_kurtosis']:.1f}\n"
                        f">{annotate_k:g}σ: {beyond['count']:,}\nGauss: {beyond['expected_gaussian']:.3g}",
                        (x[i], 0), xycoords=("data", "axes fraction"), xytext=(0, 4),
                        textcoords="offset points", ha="center", va="bottom", fontsize=7)
        lo, hi = min(np.nanmin(b["min"]), -max(sigma_lines, default=0)), np.nanmax(b["max"])
        hi = max(hi, max(sigma_lines, default=hi))
        ax.set_ylim(lo - 0.3 * (hi - lo), hi + 0.18 * (hi - lo))
    if yscale == "symlog":
        ax.set_yscale("symlog", linthresh=4.0)
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
    ax.set_xlim(-0.3, x[-1] + 0.8)
    ax.set_ylabel("normalized activation x̂ (σ units, before γ, β)")
    ax.set_title(title or "Normalized activations per layer", fontsize=10, wrap=True)
    ax.legend(loc="upper center", fontsize=7, ncol=4, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_channel_density(values, path: str | Path, *, outliers: Sequence[tuple[float, int]] = (),
                         title: str | None = None, sigma_lines: Sequence[float] = (7.0, 14.0),
                         bins: int = 120) -> Path:
    """Density of one channel's ``x̂`` with a unit-Gaussian overlay and its outliers (Fig. 3).

    ``values``: a sample of the channel's values; ``outliers``: ``(value, input index)``
    pairs (the exact top inputs), drawn as red ticks and annotated with the input index.
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size == 0:
        raise ValueError("values is empty")
    out_vals = np.array([o[0] for o in outliers], dtype=np.float64)
    lo = min(v.min(), out_vals.min() if out_vals.size else v.min(), -4.0)
    hi = max(v.max(), out_vals.max() if out_vals.size else v.max(), 4.0)
    fig = _figure(7.0, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    ax.hist(v, bins=bins, range=(lo, hi), density=True, color="#4477aa", alpha=0.75,
            label=f"x̂ sample (n={v.size})")
    grid = np.linspace(lo, hi, 600)
    ax.plot(grid, np.exp(-0.5 * grid ** 2) / math.sqrt(2 * math.pi), "k-", lw=1.0, label="N(0, 1)")
    ax.set_yscale("log")
    ax.set_ylim(bottom=max(1e-6, 0.5 / max(v.size, 1) / ((hi - lo) / bins)))
    ymin = ax.get_ylim()[0]
    labelled: list[float] = []
    for val, idx in outliers:
        ax.axvline(val, color=RED, lw=0.8, alpha=0.8)
        if len(labelled) < 8 and all(abs(val - u) > 0.02 * (hi - lo) for u in labelled):
            i = len(labelled)
            labelled.append(val)
            ax.annotate(f"#{idx}", (val, ymin), xytext=(2, 10 + 12 * (i % 4)),
                        textcoords="offset points", fontsize=7, color=RED, rotation=90)
    for k in sigma_lines:
        if lo <= k <= hi or lo <= -k <= hi:
            ax.axvline(k, color="grey", ls=":", lw=0.8)
            ax.axvline(-k, color="grey", ls=":", lw=0.8)
    ax.set_xlim(lo - 0.5, hi + 0.5)
    ax.set_xlabel("x̂ (σ units); red: most extreme inputs (#index)")
    ax.set_ylabel("density (log)")
    ax.set_title(title or "Channel density")
    ax.legend(loc="upper right", fontsize=8)
    return _save(fig, path)


def plot_band_history(history: list[dict[str, Any]], path: str | Path, *, max_layers: int = 6,
                      title: str | None = None) -> Path:
    """Bands of ``x̂`` over training iterations, one panel per layer ([HA20] Fig. 4)."""
    layers = _by_layer(history)
    names = list(layers)[:max_layers]
    if not names:
        raise ValueError("history is empty")
    fig = _figure(8.0, 2.6 * len(names))
    for i, name in enumerate(names):
        rows = layers[name]
        ax = fig.add_subplot(len(names), 1, i + 1)
        it = np.array([r["iteration"] for r in rows])
        get = lambda k: np.array([r.get(k, np.nan) for r in rows], dtype=float)  # noqa: E731
        if "q01" in rows[0]:
            ax.fill_between(it, get("q01"), get("q99"), color=GOLD, alpha=0.35, label="1–99 %")
        for k, lw in (("q25", 1.6), ("q50", 2.0), ("q75", 1.6)):
            if k in rows[0]:
                ax.plot(it, get(k), color=RED if k != "q50" else DARK, lw=lw)
        ax.plot(it, get("min"), "k-", lw=0.7, label="min / max")
        ax.plot(it, get("max"), "k-", lw=0.7)
        ax.set_ylabel("x̂ (σ)")
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(loc="upper left", fontsize=7)
    ax.set_xlabel("training iteration")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _mean_over_layers(rows: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    acc: dict[int, list[float]] = {}
    for r in rows:
        if key in r and r[key] is not None:
            acc.setdefault(r["iteration"], []).append(float(r[key]))
    it = np.array(sorted(acc))
    return it, np.array([np.mean(acc[i]) for i in it])


def plot_consistency(history: list[dict[str, Any]], path: str | Path, *,
                     series: Sequence[str] = ("bn", "fbn", "fbn_gc", "fbn_self"),
                     title: str | None = None) -> Path:
    """Mean ``|Δμ|`` and ``|Δσ²|/σ²`` of sub-batch vs full-batch moments over training
    (averaged over layers; [HA20] Fig. 9)."""
    if not history:
        raise ValueError("history is empty")
    fig = _figure(9.0, 3.6)
    colors = {"bn": "#1f77b4", "fbn": RED, "fbn_gc": "#ff7f0e", "fbn_self": "#2ca02c"}
    for j, (key, label) in enumerate((("dmean", "mean |Δμ|"), ("rel_dvar", "mean |Δσ²| / σ²"))):
        ax = fig.add_subplot(1, 2, j + 1)
        for s in series:
            it, val = _mean_over_layers(history, f"{s}_{key}")
            if it.size:
                ax.plot(it, val, lw=1.0, color=colors.get(s), label=s, alpha=0.85)
        ax.set_xlabel("training iteration")
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or "Moment consistency: sub-batch vs full batch")
    return _save(fig, path)


def plot_landscape(history: list[dict[str, Any]], path: str | Path, *, title: str | None = None) -> Path:
    """Loss range and gradient change along the gradient direction ([HA20] Fig. 7)."""
    if not history:
        raise ValueError("history is empty")
    it = np.array([r["iteration"] for r in history])
    fig = _figure(9.0, 3.6)
    ax = fig.add_subplot(1, 2, 1)
    ax.fill_between(it, [r["loss_min"] for r in history], [r["loss_max"] for r in history],
                    color=RED, alpha=0.4, label="min–max over step sizes")
    ax.plot(it, [r["loss"] for r in history], color=DARK, lw=0.8, label="loss")
    ax.set_xlabel("training iteration")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title("loss landscape", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax = fig.add_subplot(1, 2, 2)
    ax.plot(it, [r["grad_change_max"] for r in history], color="#1f77b4", lw=0.9)
    ax.set_xlabel("training iteration")
    ax.set_ylabel("max ‖∇L(θ − ηg) − g‖₂")
    ax.set_title("gradient predictiveness", fontsize=9)
    ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_gradient_factor(history: list[dict[str, Any]], path: str | Path, *,
                         max_layers: int = 12, title: str | None = None) -> Path:
    """Per-layer gradient factor ``γ/sqrt(σ_B²+ε)``, ``|γ − γ₀|`` and ``|β|`` over time
    ([DF21] eq. 20, §3.2)."""
    layers = _by_layer(history)
    if not layers:
        raise ValueError("history is empty")
    fig = _figure(12.0, 3.6)
    panels = (("factor_mean", "gradient factor γ/√(σ²+ε)"), ("gamma_drift_mean", "mean |γ − γ₀|"),
              ("beta_abs_mean", "mean |β|"))
    for j, (key, label) in enumerate(panels):
        ax = fig.add_subplot(1, 3, j + 1)
        for name in list(layers)[:max_layers]:
            rows = [r for r in layers[name] if key in r]
            if rows:
                ax.plot([r["iteration"] for r in rows], [r[key] for r in rows], lw=1.0, label=name)
        ax.set_xlabel("training iteration")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
        if j == 0:
            ax.set_yscale("log")
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_distribution_shapes(shapes: dict[str, dict[str, Any]], path: str | Path, *,
                             max_layers: int = 6, title: str | None = None) -> Path:
    """Histograms of ``Wu + b`` (pre), ``x̂`` and ``u`` (post) per layer with skew/kurtosis."""
    names = list(shapes)[:max_layers]
    if not names:
        raise ValueError("shapes is empty")
    parts = (("pre", "Wu + b (norm input)"), ("normalized", "x̂"), ("post", "u = act(·)"))
    fig = _figure(11.0, 2.4 * len(names))
    for i, name in enumerate(names):
        for j, (part, label) in enumerate(parts):
            ax = fig.add_subplot(len(names), 3, 3 * i + j + 1)
            s = shapes[name].get(part)
            if s is None:
                ax.text(0.5, 0.5, "not found", ha="center", va="center", transform=ax.transAxes)
                ax.set_axis_off()
                continue
            edges = np.array(s["histogram"]["edges"])
            counts = np.array(s["histogram"]["counts"], dtype=float)
            ax.stairs(counts / max(counts.sum(), 1) , edges, fill=True, color="#4477aa", alpha=0.8)
            ax.set_yscale("log")
            ax.set_title(f"{name}: {label}\nskew {s['skewness']:.2f}, ex.kurt {s['excess_kurtosis']:.2f},"
                         f" zeros {s['zero_fraction']:.0%}", fontsize=8)
            ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title)
    return _save(fig, path)
