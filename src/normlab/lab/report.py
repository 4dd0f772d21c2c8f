"""Reports of a comparison: Markdown, CSV and PNG plots, rendered from the run store alone.

``render_report(out_dir)`` reads the plan and the finished runs from ``out_dir/runs.sqlite``
and writes:

* ``report.md`` — per group, a table with each method's test accuracy (mean ± std over
  seeds, at the epoch with the best validation accuracy), the number of runs, the
  one-sided paired t-test p-value against the baseline (pairs by seed); significant
  improvements (p < 0.05) are **bold** and the best mean is <u>underlined</u>, as in the
  [DF21] (§4.3);
* ``results.csv`` — the same numbers, one row per method and group;
* ``runs.csv`` — one row per run (seed, chosen epoch, val/test accuracy, time);
* ``curves.png`` — validation and test accuracy per epoch, mean with a ±1 std band;
* ``final.png`` — final test accuracy, mean with ±1 std error bars;
* ``batch_size.png`` — accuracy versus batch size, when the batch size varies;
* ``percentiles.png`` / ``shape.png`` — the probes' records (``RunConfig.probe``): the
  15/50/85th percentiles of a sigmoid's input over training ([IS15] Fig. 1(b, c)), and
  the skewness, excess kurtosis and zero fraction of ``Wu + b`` and ``u`` per evaluation,
  with a table of the latter in ``report.md``.

Tables also show, where they apply: the number of runs that diverged (a non-finite loss
stopped them; their score is the best validation epoch before), the paper's reported number
(``--scale paper``), and extra paired tests at a fixed evaluation (``Plan.scores``,
``"eval:K"``: the test accuracy at the K-th evaluation, for claims about training speed).

``normlab report DIR`` re-renders them.
"""

from __future__ import annotations

import csv
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .presets import Plan
from .probe_report import probe_markdown, probe_plots, save_figure
from .stats import PairedTest, Summary, paired_ttest, summarize
from .store import RunStore

__all__ = ["ResultRow", "compute_results", "render_report", "format_table"]


@dataclass(frozen=True)
class ResultRow:
    """One method in one group: its score summary and its test against the baseline."""

    group: str
    label: str
    config_hash: str
    batch_size: int
    summary: Summary
    scores: dict[int, float]
    test: PairedTest | None   # None for the baseline itself
    is_baseline: bool
    is_best: bool
    mean_time: float
    diverged: int = 0         # runs stopped by a non-finite loss
    reported: str = ""        # the paper's number (--scale paper)


def load_plan(store: RunStore) -> Plan:
    data = store.get_meta("plan")
    if data is None:
        raise ValueError(f"{store.out_dir} holds no comparison plan; run `normlab compare "
                         f"--out {store.out_dir}` first")
    try:
        return Plan.from_dict(data)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ValueError(f"run database {str(store.path)!r}: the stored plan is malformed "
                         f"({type(error).__name__}: {error}); move the file away or use "
                         f"another --out") from None


def score_of(run, score: str = "best-val") -> float | None:
    """A run's score: ``"best-val"`` — its stored test accuracy (at the best-validation
    evaluation); ``"eval:K"`` — the test accuracy of its K-th evaluation (1-based; a run
    that stopped earlier, by divergence, keeps its last evaluation's)."""
    if score == "best-val":
        return run.test_acc
    if not score.startswith("eval:"):
        raise ValueError(f"score must be 'best-val' or 'eval:K', got {score!r}")
    k = int(score.split(":", 1)[1])
    if not run.epochs:
        return None
    return run.epochs[min(k, len(run.epochs)) - 1].get("test_acc")


def score_title(score: str) -> str:
    if score == "best-val":
        return "test accuracy at the best-validation evaluation"
    return f"test accuracy at evaluation {score.split(':', 1)[1]}"


def compute_results(plan: Plan, store: RunStore, *, alpha: float = 0.05,
                    score: str = "best-val") -> list[ResultRow]:
    """Summaries and paired t-tests for every variant of ``plan`` (runs of the plan's seeds),
    by ``score`` (:func:`score_of`)."""
    runs_by_hash: dict[str, dict[int, Any]] = {}
    for run in store.runs():
        runs_by_hash.setdefault(run.config_hash, {})[run.seed] = run
    seeds = set(plan.seeds)
    rows: list[ResultRow] = []
    for group in plan.groups:
        variants = [v for v in plan.variants if v.group == group]
        scores: dict[str, dict[int, float]] = {}
        times: dict[str, float] = {}
        diverged: dict[str, int] = {}
        for v in variants:
            runs = {s: r for s, r in runs_by_hash.get(v.config.config_hash(), {}).items()
                    if s in seeds and score_of(r, score) is not None}
            scores[v.label] = {s: float(score_of(r, score)) for s, r in runs.items()}
            diverged[v.label] = sum(bool(r.extra.get("diverged")) for r in runs.values())
            times[v.label] = (sum(r.wall_time for r in runs.values()) / len(runs)
                              if runs else math.nan)
        base = scores.get(plan.baseline, {})
        means = {label: summarize(list(sc.values())).mean for label, sc in scores.items()}
        finite = [m for m in means.values() if m == m]
        best = max(finite) if finite else None
        for v in variants:
            sc = scores[v.label]
            is_base = v.label == plan.baseline
            rows.append(ResultRow(
                group=group, label=v.label, config_hash=v.config.config_hash(),
                batch_size=v.config.batch_size, summary=summarize(list(sc.values())),
                scores=sc, test=None if is_base else paired_ttest(sc, base, alpha=alpha),
                is_baseline=is_base, is_best=best is not None and means[v.label] == best,
                mean_time=times[v.label], diverged=diverged[v.label],
                reported=plan.reported_for(group, v.label)))
    return rows


def format_table(rows: list[ResultRow], *, markdown: bool = True) -> str:
    """The results table; Markdown marks significance in bold and the best mean underlined,
    the plain-text form (for the terminal) uses ``*`` and ``^``."""
    lines: list[str] = []
    groups = []
    for r in rows:
        if r.group not in groups:
            groups.append(r.group)
    for group in groups:
        if group:
            lines.append(f"\n**{group}**\n" if markdown else f"\n[{group}]")
        header = ["method", "test acc % (mean ± std)", "runs", "p vs baseline", "better?"]
        show_diverged = any(r.diverged for r in rows)
        show_paper = any(r.reported for r in rows)
        if show_diverged:
            header.append("diverged")
        if show_paper:
            header.append("paper")
        body = []
        for r in (x for x in rows if x.group == group):
            acc = "—" if r.summary.n == 0 else f"{r.summary.mean:.2f} ± {r.summary.std:.2f}"
            if r.is_baseline:
                p, verdict = "baseline", ""
            elif r.test is None or r.test.p != r.test.p:
                p, verdict = "n/a", ""
            else:
                p = f"{r.test.p:.3g}"
                verdict = "yes" if r.test.significant else "no"
            sig = r.test is not None and r.test.significant
            if markdown:
                if sig:
                    acc = f"**{acc}**"
                if r.is_best:
                    acc = f"<u>{acc}</u>"
            else:
                acc += (" *" if sig else "") + (" ^" if r.is_best else "")
            row = [r.label, acc, str(r.summary.n), p, verdict]
            if show_diverged:
                row.append(f"{r.diverged}/{r.summary.n}" if r.diverged else "")
            if show_paper:
                row.append(r.reported or "—")
            body.append(row)
        if markdown:
            lines.append("| " + " | ".join(header) + " |")
            lines.append("|" + "|".join(["---"] + ["---:"] * 3 + [":---:"]
                                        + ["---:"] * (len(header) - 5)) + "|")
            lines += ["| " + " | ".join(row) + " |" for row in body]
        else:
            widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(header)]
            fmt = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths))  # noqa: E731
            lines.append(fmt(header))
            lines.append("  ".join("-" * w for w in widths))
            lines += [fmt(row) for row in body]
    if not markdown:
        lines.append("* significantly better than the baseline (one-sided paired t-test, "
                     "p < 0.05); ^ best mean")
    if any(r.diverged for r in rows):
        lines.append("diverged: runs a non-finite loss stopped (scored at their best "
                     "validation evaluation before it)")
    return "\n".join(lines).lstrip("\n")


def render_report(out_dir: str | Path, *, plots: bool = True, plan: Plan | None = None,
                  to: str | Path | None = None) -> dict[str, Path]:
    """Write ``report.md``, ``results.csv``, ``runs.csv`` and the PNG plots of ``plan``
    (default: the folder's own) from ``out_dir``'s run store, which is only read, into ``to``
    (default: ``out_dir``); returns ``{name: path}`` of the files written."""
    store = RunStore(out_dir, readonly=True)
    plan = plan if plan is not None else load_plan(store)
    rows = compute_results(plan, store)
    out = Path(to) if to is not None else Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}

    with open(out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["group", "method", "batch_size", "n", "mean_test_acc", "std_test_acc",
                    "t", "p", "significant", "baseline", "best", "mean_seconds",
                    "config_hash", "diverged", "paper"])
        for r in rows:
            t = r.test
            w.writerow([r.group, r.label, r.batch_size, r.summary.n, _fmt(r.summary.mean),
                        _fmt(r.summary.std), _fmt(t.t) if t else "", _fmt(t.p) if t else "",
                        int(bool(t and t.significant)), int(r.is_baseline), int(r.is_best),
                        _fmt(r.mean_time), r.config_hash, r.diverged, r.reported])
    written["results.csv"] = out / "results.csv"
    extra_rows = {score: compute_results(plan, store, score=score) for score in plan.scores}
    for score, score_rows in extra_rows.items():
        name = f"results-{score.replace(':', '')}.csv"
        with open(out / name, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["group", "method", "n", "mean_test_acc", "std_test_acc", "t", "p",
                        "significant", "baseline"])
            for r in score_rows:
                t = r.test
                w.writerow([r.group, r.label, r.summary.n, _fmt(r.summary.mean),
                            _fmt(r.summary.std), _fmt(t.t) if t else "",
                            _fmt(t.p) if t else "", int(bool(t and t.significant)),
                            int(r.is_baseline)])
        written[name] = out / name

    label_of = {v.config.config_hash(): (v.group, v.label) for v in plan.variants}
    seeds = set(plan.seeds)
    runs = [r for r in store.runs() if r.config_hash in label_of and r.seed in seeds]
    with open(out / "runs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["group", "method", "seed", "chosen_epoch", "val_acc", "test_acc",
                    "seconds", "device", "config_hash"])
        for r in runs:
            g, label = label_of[r.config_hash]
            w.writerow([g, label, r.seed, r.chosen_epoch, _fmt(r.val_acc), _fmt(r.test_acc),
                        _fmt(r.wall_time), r.device, r.config_hash])
    written["runs.csv"] = out / "runs.csv"

    if plots:
        written.update(_plots(plan, rows, runs, label_of, out))

        written.update(probe_plots(plan, runs, out))

    total = len(plan.variants) * len(plan.seeds)
    done = sum(r.summary.n for r in rows)
    base_cfg = plan.variants[0].config
    md = [f"# normlab comparison: {plan.name}", "", plan.description, "",
          f"- runs finished: {done} of {total} (seeds {_seed_text(plan.seeds)})",
          f"- data `{base_cfg.data}`, model `{base_cfg.model}` (placement "
          f"`{base_cfg.placement}`), epochs {base_cfg.epochs}"
          + (f", steps {base_cfg.steps}" if base_cfg.steps else "")
          + f", lr {base_cfg.lr:g}, input norm `{base_cfg.input_norm}`",
          f"- score: test accuracy at the epoch with the best validation accuracy; baseline "
          f"`{plan.baseline}`; one-sided paired t-test by seed, p < 0.05 in **bold**, best mean "
          f"<u>underlined</u>"]
    if plan.scale == "paper":
        md.append("- scale: **paper** (the paper's configuration; its reported numbers in the "
                  "column *paper*)")
    if plan.notes:
        md.append(f"- notes: {plan.notes}")
    md.append("")
    if runs:
        versions = runs[0].versions
        md.append(f"- device `{runs[0].device}`, " + ", ".join(
            f"{k} {v}" for k, v in versions.items()))
        md.append(f"- total training time {sum(r.wall_time for r in runs):.0f} s")
        if any(r.extra.get("artifacts") for r in runs):
            md.append("- diagnostics (`--diagnose`): per-run artifacts in "
                      "`artifacts/<config hash>-seed<N>/`")
        md.append("")
    md.append(format_table(rows, markdown=True))
    md.append("")
    for score, score_rows in extra_rows.items():
        md += [f"## Paired test at a fixed point: {score_title(score)}", "",
               format_table(score_rows, markdown=True), ""]

    md += probe_markdown(plan, runs)
    md.append("## Configurations\n")
    md.append("| group | method | norm | γ | c | batch | other settings | config hash |")
    md.append("|---|---|---|---|---|---|---|---|")
    first = plan.variants[0].config.to_dict()
    for v in plan.variants:
        c = v.config
        other = ", ".join(f"{k}={val}" for k, val in c.to_dict().items()
                          if k not in ("norm", "gamma", "gamma_lr_divisor", "batch_size")
                          and (val != first.get(k) or k in ("lr", "model_options")
                               and val))
        md.append(f"| {v.group} | {v.label} | `{c.norm}` | {c.gamma if c.gamma is not None else 'default'} "
                  f"| {c.gamma_lr_divisor:g} | {c.batch_size} | {other} | `{c.config_hash()}` |")
    for name in ("curves.png", "final.png", "batch_size.png", "percentiles.png", "shape.png"):
        if name in written:
            md += ["", f"![{name}]({name})"]
    (out / "report.md").write_text("\n".join(md) + "\n")
    written["report.md"] = out / "report.md"
    return written


def _fmt(x: float | None) -> str:
    if x is None or x != x:
        return ""
    return f"{x:.6g}"


def _seed_text(seeds: list[int]) -> str:
    if seeds == list(range(seeds[0], seeds[0] + len(seeds))) and len(seeds) > 2:
        return f"{seeds[0]}..{seeds[-1]}"
    return ", ".join(map(str, seeds))


def _plots(plan: Plan, rows: list[ResultRow], runs, label_of, out: Path) -> dict[str, Path]:
    import matplotlib  # lazy: optional dependency (matplotlib)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: optional dependency (matplotlib)

    written: dict[str, Path] = {}
    groups = plan.groups
    # accuracy curves with ±1 std bands, one panel per group and split
    fig, axes = plt.subplots(len(groups), 2, figsize=(11, 3.6 * len(groups)), squeeze=False)
    for gi, group in enumerate(groups):
        for si, split in enumerate(("val_acc", "test_acc")):
            ax = axes[gi][si]
            for v in (v for v in plan.variants if v.group == group):
                curves = [r.epochs for r in runs if r.config_hash == v.config.config_hash()]
                if not curves:
                    continue
                # a diverged run stopped early: hold it at its last evaluation (its NaN
                # model's test accuracy) rather than cutting every curve short
                longest = max(curves, key=len)
                length = len(longest)
                values = np.array([[m[split] if m[split] is not None else np.nan
                                    for m in c + c[-1:] * (length - len(c))] for c in curves],
                                  dtype=float)
                key = "step" if v.config.steps else "epoch"
                x = np.array([m.get(key, m["epoch"]) for m in longest])
                with warnings.catch_warnings():  # an evaluation where every run is NaN
                    warnings.simplefilter("ignore", RuntimeWarning)
                    mean = np.nanmean(values, axis=0)
                    std = np.nanstd(values, axis=0, ddof=1) if len(curves) > 1 else 0 * mean
                ax.plot(x, mean, marker="o", ms=3, label=v.label)
                ax.fill_between(x, mean - std, mean + std, alpha=0.2)
            title = ("validation" if split == "val_acc" else "test") + " accuracy"
            ax.set_title(f"{title} {('— ' + group) if group else ''}".strip())
            ax.set_xlabel("epoch" if not plan.variants[0].config.steps
                          else "training step")
            ax.set_ylabel("accuracy (%)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    save_figure(plt, fig, out, "curves.png", written)

    # final accuracy with error bars
    fig, ax = plt.subplots(figsize=(max(5, 0.7 * len(rows) + 2), 4))
    names = [f"{r.label}\n{r.group}" if r.group else r.label for r in rows]
    means = [r.summary.mean for r in rows]
    stds = [r.summary.std for r in rows]
    colors = ["tab:red" if (r.test and r.test.significant) else
              ("tab:gray" if r.is_baseline else "tab:blue") for r in rows]
    ax.bar(range(len(rows)), means, yerr=stds, capsize=4, color=colors)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(names, rotation=45 if len(rows) > 6 else 0, ha="right" if len(rows) > 6
                       else "center", fontsize=8)
    finite = [m - s for m, s in zip(means, stds) if m == m]
    if finite:
        ax.set_ylim(max(0.0, min(finite) - 2.0), min(100.0, max(m + s for m, s in
                                                               zip(means, stds) if m == m) + 1))
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("final test accuracy, mean ± std\n(gray: baseline; red: significantly better, "
                 "p < 0.05)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    save_figure(plt, fig, out, "final.png", written)

    # accuracy vs batch size
    sizes = sorted({r.batch_size for r in rows})
    if len(sizes) > 1:
        fig, ax = plt.subplots(figsize=(6, 4))
        labels = []
        for r in rows:
            if r.label not in labels:
                labels.append(r.label)
        for label in labels:
            pts = sorted((r.batch_size, r.summary.mean, r.summary.std) for r in rows
                         if r.label == label and r.summary.n > 0)
            if not pts:
                continue
            xs, ms, ss = zip(*pts)
            ax.errorbar(xs, ms, yerr=ss, marker="o", capsize=3, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes)
        ax.set_xticklabels([str(s) for s in sizes])
        ax.set_xlabel("batch size")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title("accuracy vs batch size (mean ± std)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save_figure(plt, fig, out, "batch_size.png", written)
    return written
