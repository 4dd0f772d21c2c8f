"""Write a recorder's findings to disk: plots, JSON/CSV and a short Markdown summary."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

from .io import write_csv, write_json
from .plots import plot_channel_density, plot_distribution_shapes, plot_layer_bands
from .recorder import ActivationRecorder
from .stats import gaussian_tail_probability

__all__ = ["band_rows", "outlier_channels", "write_recorder_report", "markdown_summary"]


def band_rows(summary: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per layer: bands, counts beyond kσ, Gaussian expectation, shape."""
    rows = []
    for name, s in summary.items():
        row = {"layer": name, "type": s["type"], "n": s["n"], "mean": s["mean"], "std": s["std"],
               "skewness": s["skewness"], "excess_kurtosis": s["excess_kurtosis"], **s["bands"]}
        for k, b in s["beyond"].items():
            row[f"beyond_{k:g}"] = b["count"]
            row[f"expected_{k:g}"] = b["expected_gaussian"]
        rows.append(row)
    return rows


def outlier_channels(recorder: ActivationRecorder, count: int = 3, k: float = 7.0) -> list[tuple[str, int]]:
    """The ``count`` (layer, channel) pairs with the most values beyond ``k``σ (ties: the
    largest |value|), over all layers — the channels worth a density plot ([HA20] Fig. 3)."""
    cands = []
    for name in recorder.layer_names:
        rec = recorder[name]
        col = rec.sigmas.index(k) if k in rec.sigmas else 0
        peak = rec.topk.values.abs()[:, 0] if rec.topk.values.shape[1] else None
        for c in range(rec.channels):
            cands.append((int(rec.channel_beyond[c, col]), float(peak[c]) if peak is not None else 0.0,
                          name, c))
    cands.sort(key=lambda t: (t[0], t[1]), reverse=True)
    return [(name, c) for _, _, name, c in cands[:count]]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "root"


def markdown_summary(summary: dict[str, dict[str, Any]], *, title: str = "Activation outliers",
                     labels: Sequence[Any] | None = None, context: str = "",
                     images: Sequence[str] = ()) -> str:
    """Short Markdown: per-layer table and where the outliers are (channels, inputs)."""
    lines = [f"# {title}", ""]
    if context:
        lines += [context, ""]
    ks = list(next(iter(summary.values()))["beyond"]) if summary else []
    p7 = gaussian_tail_probability(7.0)
    lines += [
        "Values are normalized activations x̂ (before γ, β) in units of the layer's σ. A unit "
        f"Gaussian exceeds ±7σ with probability {p7:.3g} (1 in {1 / p7:,.0f}).", "",
        "| layer | type | values | min | 1% | 50% | 99% | max | ex. kurtosis | "
        + " | ".join(f">{k:g}σ (Gauss. exp.)" for k in ks) + " |",
        "|" + "---|" * (9 + len(ks)),
    ]
    for name, s in summary.items():
        b = s["bands"]
        cells = [f"{s['beyond'][k]['count']} ({s['beyond'][k]['expected_gaussian']:.2g})" for k in ks]
        lines.append(f"| {name} | {s['type']} | {s['n']:,} | {b.get('min', float('nan')):.2f} | "
                     f"{b.get('q01', float('nan')):.2f} | {b.get('q50', float('nan')):.2f} | "
                     f"{b.get('q99', float('nan')):.2f} | {b.get('max', float('nan')):.2f} | "
                     f"{s['excess_kurtosis']:.2f} | " + " | ".join(cells) + " |")
    lines += ["", "## Where the outliers are", ""]
    any_out = False
    for name, s in summary.items():
        for ch in s["outlier_channels"][:3]:
            any_out = True
            k = s["outlier_channels_by"]
            inputs = ", ".join(
                f"#{i}" + (f" (label {labels[i]})" if labels is not None and 0 <= i < len(labels) else "")
                + f": {v:+.1f}σ" for i, v in zip(ch["top_inputs"][:5], ch["top_values"][:5]))
            lines.append(f"- `{name}` channel {ch['channel']}: {ch['beyond'][k]} values beyond "
                         f"{k:g}σ from {ch['samples_beyond'][k]} inputs; most extreme inputs {inputs}")
    if not any_out:
        lines.append(f"No value beyond {min(ks, default=4):g}σ was recorded.")
    if images:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in images]
    return "\n".join(lines) + "\n"


def write_recorder_report(recorder: ActivationRecorder, out_dir: str | Path, *,
                          title: str = "Activation outliers", labels: Sequence[Any] | None = None,
                          context: str = "", density_channels: int = 3,
                          shapes: dict[str, Any] | None = None) -> list[Path]:
    """Write ``summary.json``, ``bands.csv``, ``layer_bands.png``, channel densities
    (``channel_<layer>_<c>.png`` + ``.json``), optional distribution shapes and ``summary.md``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = recorder.summary()
    paths = [write_json({"layers": summary, "totals": recorder.totals()}, out / "summary.json"),
             write_csv(band_rows(summary), out / "bands.csv")]
    images = [plot_layer_bands(summary, out / "layer_bands.png", title=title)]
    if recorder.channel_sample_size > 0:
        k_rank = max((s["outlier_channels_by"] for s in summary.values()), default=7.0)
        for name, c in outlier_channels(recorder, density_channels, k=k_rank):
            rec = recorder[name]
            values = rec.channel_values(c)
            top = list(zip(rec.topk.values[c].tolist(), rec.topk.indices[c].tolist()))
            stem = f"channel_{_slug(name)}_{c}"
            paths.append(write_json({"layer": name, "channel": c, "sample": values.tolist(),
                                     "top_values": [t[0] for t in top],
                                     "top_inputs": [t[1] for t in top]}, out / f"{stem}.json"))
            images.append(plot_channel_density(values.numpy(), out / f"{stem}.png", outliers=top,
                                               title=f"{name}, channel {c}"))
    if shapes:
        paths.append(write_json(shapes, out / "distribution_shapes.json"))
        images.append(plot_distribution_shapes(shapes, out / "distribution_shapes.png"))
    md = out / "summary.md"
    md.write_text(markdown_summary(summary, title=title, labels=labels, context=context,
                                   images=[str(p) for p in images]))
    return paths + images + [md]
