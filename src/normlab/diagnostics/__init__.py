"""Diagnostics: look at the distributions the normalization papers talk about
(Horváth & Al-afandi 2020 [HA20], Davis & Frank 2021 [DF21], Ioffe & Szegedy 2015 [IS15] §3.2;
references in docs/references.md).

* :class:`ActivationRecorder` — hooks on every normalization layer recording ``x̂`` (before
  γ, β) with bounded memory: quantile bands, exact counts beyond kσ, kurtosis, top inputs.
* :mod:`.stats` — the statistics (Gaussian tail ``P(|Z| > k) = erfc(k/√2)``, bands, …).
* :mod:`.callbacks` — training callbacks for the lab: bands per iteration, moment
  consistency, loss/gradient landscape, BN gradient factor.
* :mod:`.report` — plots + JSON/CSV + Markdown summary of a recorder.
* :mod:`.shape` — distribution shape of ``Wu + b`` vs ``u`` around a nonlinearity.
* :mod:`.plots` — figures in the style of [HA20] (matplotlib, imported lazily) plus JSON/CSV.
* ``normlab inspect`` (:mod:`.cli`).
"""

from .callbacks import (
    BandTracker,
    GradientFactorTracker,
    LossLandscape,
    MomentConsistency,
    default_callbacks,
    measure_landscape,
)
from .recorder import (
    ActivationRecorder,
    LayerRecord,
    NormParts,
    find_norm_layers,
    norm_kind,
    norm_parts,
    normalized_input,
    paused,
    record_activations,
)
from .stats import (
    DEFAULT_QUANTILES,
    DEFAULT_SIGMAS,
    count_beyond,
    excess_kurtosis,
    gaussian_expected_count,
    gaussian_tail_probability,
    quantile_bands,
    skewness,
    summarize,
    top_inputs,
)
from .report import write_recorder_report
from .shape import distribution_shapes, find_activation_after, shape_stats

__all__ = [
    "ActivationRecorder", "LayerRecord", "NormParts", "find_norm_layers", "norm_kind",
    "norm_parts", "normalized_input", "paused", "record_activations",
    "DEFAULT_QUANTILES", "DEFAULT_SIGMAS", "count_beyond", "excess_kurtosis",
    "gaussian_expected_count", "gaussian_tail_probability", "quantile_bands", "skewness",
    "summarize", "top_inputs",
    "BandTracker", "GradientFactorTracker", "LossLandscape", "MomentConsistency",
    "default_callbacks", "measure_landscape", "write_recorder_report", "distribution_shapes",
    "find_activation_after", "shape_stats",
]
