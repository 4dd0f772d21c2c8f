"""Outlier statistics of normalized activations, exact or streaming.

Horváth & Al-afandi 2020 [HA20] (arXiv 2010.08251, §II.B, Fig. 1–4)
measures normalized activations ``x̂ = (x − μ)/sqrt(σ² + ε)`` (before γ, β) and finds values
far beyond what a unit Gaussian allows. The numbers behind those figures are here:

* quantile bands (min, 1 %, 25 %, 50 %, 75 %, 99 %, max by default; Fig. 1, 2, 4);
* exact counts of values with ``|x̂| > k`` for ``k ∈ {4, 7, 10, 14}`` and the count a unit
  Gaussian would produce, ``n · P(|Z| > k) = n · 2(1 − Φ(k)) = n · erfc(k/√2)`` — for
  ``k = 7`` that probability is 1/390,682,215,445 ([HA20] §II.B);
* skewness and excess kurtosis (a Gaussian has 0 and 0);
* per channel, the inputs (sample indices) that produce the largest values (Fig. 3).

Everything exists twice: as plain functions of a tensor/array (``summarize``) and as
streaming accumulators with bounded memory (``RunningMoments``, ``Reservoir``,
``ChannelTopK``) that :class:`normlab.diagnostics.ActivationRecorder` feeds batch by batch.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DEFAULT_QUANTILES",
    "DEFAULT_SIGMAS",
    "gaussian_tail_probability",
    "gaussian_expected_count",
    "count_beyond",
    "quantile_bands",
    "band_name",
    "skewness",
    "excess_kurtosis",
    "summarize",
    "top_inputs",
    "histogram",
    "RunningMoments",
    "Reservoir",
    "ChannelReservoir",
    "ChannelTopK",
]

#: Quantile levels of the default band ([HA20] Fig. 1: min/max dashed, 1–99 % golden,
#: 25–75 % red, and the median).
DEFAULT_QUANTILES: tuple[float, ...] = (0.0, 0.01, 0.25, 0.5, 0.75, 0.99, 1.0)
#: The k of "beyond kσ" counts: 4σ ([HA20] appendix: 98 % inside ±4σ), 7σ (§II.B), 10σ (Fig. 4),
#: 14σ (Fig. 3).
DEFAULT_SIGMAS: tuple[float, ...] = (4.0, 7.0, 10.0, 14.0)


# ---------------------------------------------------------------------------------------
# Gaussian reference
# ---------------------------------------------------------------------------------------
def _check_k(k: float) -> float:
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not k >= 0:
        raise ValueError(f"k must be a number >= 0 (a multiple of σ), got {k!r}")
    return float(k)


def gaussian_tail_probability(k: float) -> float:
    """Two-sided tail of a unit Gaussian: ``P(|Z| > k) = 2(1 − Φ(k)) = erfc(k/√2)``.

    ``erfc`` keeps full relative precision far in the tail (``1 − Φ(k)`` would round to 0).
    ``1 / gaussian_tail_probability(7) ≈ 390,682,215,445`` ([HA20] §II.B).
    """
    return math.erfc(_check_k(k) / math.sqrt(2.0))


def gaussian_expected_count(n: int | float, k: float) -> float:
    """Expected number of values beyond ``±kσ`` among ``n`` unit-Gaussian values: ``n·erfc(k/√2)``."""
    if isinstance(n, bool) or not isinstance(n, (int, float)) or n < 0:
        raise ValueError(f"n must be a count >= 0, got {n!r}")
    return float(n) * gaussian_tail_probability(k)


# ---------------------------------------------------------------------------------------
# Exact statistics of one array
# ---------------------------------------------------------------------------------------
def _as_flat_float64(values) -> Tensor:
    if isinstance(values, np.ndarray):
        values = torch.from_numpy(values)
    if not isinstance(values, Tensor):
        raise TypeError(f"values must be a torch.Tensor or numpy array, got {type(values).__name__}")
    if values.numel() == 0:
        raise ValueError(f"values is empty (shape {tuple(values.shape)}); record some activations first")
    return values.detach().reshape(-1).to(device="cpu", dtype=torch.float64)


def _check_sigmas(ks: Iterable[float]) -> tuple[float, ...]:
    ks = tuple(_check_k(k) for k in ks)
    if not ks:
        raise ValueError("ks is empty: give at least one k, e.g. ks=(4, 7, 10, 14)")
    return ks


def _check_quantiles(qs: Iterable[float]) -> tuple[float, ...]:
    qs = tuple(float(q) for q in qs)
    if not qs or any(not 0.0 <= q <= 1.0 for q in qs):
        raise ValueError(f"quantiles must be a non-empty list of levels in [0, 1], got {qs!r}")
    return qs


def count_beyond(values, ks: Sequence[float] = DEFAULT_SIGMAS) -> dict[float, int]:
    """Exact number of entries with ``|v| > k`` for each ``k`` (values in units of σ)."""
    flat = _as_flat_float64(values).abs()
    return {k: int((flat > k).sum()) for k in _check_sigmas(ks)}


def band_name(q: float) -> str:
    """Key of a quantile level: ``0 → "min"``, ``1 → "max"``, ``0.01 → "q01"``, ``0.5 → "q50"``."""
    if q == 0.0:
        return "min"
    if q == 1.0:
        return "max"
    pct = q * 100
    return f"q{pct:02.0f}" if abs(pct - round(pct)) < 1e-9 else f"q{pct:g}".replace(".", "_")


def quantile_bands(values, quantiles: Sequence[float] = DEFAULT_QUANTILES) -> dict[str, float]:
    """Quantiles of ``values`` keyed by :func:`band_name` (linear interpolation, as numpy)."""
    qs = _check_quantiles(quantiles)
    flat = _as_flat_float64(values).numpy()
    out = np.quantile(flat, qs)
    return {band_name(q): float(v) for q, v in zip(qs, out)}


def _central_moments(flat: Tensor) -> tuple[int, float, float, float, float]:
    """(n, mean, Σd², Σd³, Σd⁴) with d = v − mean; products in the input dtype, sums in float64."""
    n = flat.numel()
    mean = float(flat.sum(dtype=torch.float64)) / n
    d = flat - mean
    d2 = d * d
    return (n, mean, float(d2.sum(dtype=torch.float64)), float((d2 * d).sum(dtype=torch.float64)),
            float((d2 * d2).sum(dtype=torch.float64)))


def _shape_from_sums(n: int, m2: float, m3: float, m4: float) -> tuple[float, float]:
    """(skewness, excess kurtosis), biased estimators (= scipy.stats.skew / kurtosis defaults)."""
    if n < 2 or m2 <= 0:
        return float("nan"), float("nan")
    skew = math.sqrt(n) * m3 / m2 ** 1.5
    kurt = n * m4 / (m2 * m2) - 3.0
    return skew, kurt


def skewness(values) -> float:
    """``g1 = m3 / m2^{3/2}`` with biased central moments ``m_r = 1/n Σ (v − v̄)^r``."""
    n, _, m2, m3, m4 = _central_moments(_as_flat_float64(values))
    return _shape_from_sums(n, m2, m3, m4)[0]


def excess_kurtosis(values) -> float:
    """``g2 = m4 / m2² − 3`` (0 for a Gaussian; large for "Gaussian plus rare huge values")."""
    n, _, m2, m3, m4 = _central_moments(_as_flat_float64(values))
    return _shape_from_sums(n, m2, m3, m4)[1]


def summarize(values, *, ks: Sequence[float] = DEFAULT_SIGMAS,
              quantiles: Sequence[float] = DEFAULT_QUANTILES, standardize: bool = False) -> dict:
    """All outlier statistics of one array of (normalized) values.

    Args:
        values: tensor or array; already normalized values are in units of σ.
        ks: multiples of σ for the exact counts ``|v| > k``.
        quantiles: band levels.
        standardize: first z-score the values with their own mean and (biased) std — use
            for raw, not yet normalized activations.

    Returns a dict with ``n, mean, std, skewness, excess_kurtosis, bands`` and, per k,
    ``beyond[k] = {"count", "expected_gaussian", "ratio"}`` (ratio = count / expected).
    """
    flat = _as_flat_float64(values)
    n, mean, m2, m3, m4 = _central_moments(flat)
    std = math.sqrt(m2 / n)
    if standardize:
        if std == 0:
            raise ValueError("cannot standardize constant values (std = 0)")
        flat = (flat - mean) / std
    skew, kurt = _shape_from_sums(n, m2, m3, m4)
    counts = count_beyond(flat, ks)
    return {
        "n": n,
        "mean": mean,
        "std": std,
        "skewness": skew,
        "excess_kurtosis": kurt,
        "bands": quantile_bands(flat, quantiles),
        "beyond": {k: _beyond_entry(c, n, k) for k, c in counts.items()},
    }


def _beyond_entry(count: int, n: int, k: float) -> dict:
    expected = gaussian_expected_count(n, k)
    return {"count": int(count), "expected_gaussian": expected,
            "ratio": (count / expected) if expected > 0 else float("inf")}


def _channel_last_view(x: Tensor, channel_dim: int) -> Tensor:
    """``x`` with the sample axis 0 → ``(N, C, L)``."""
    if x.dim() < 2:
        raise ValueError(f"expected at least (N, C) values, got shape {tuple(x.shape)}")
    channel_dim = channel_dim % x.dim()
    if channel_dim == 0:
        raise ValueError("channel_dim must not be the sample axis 0")
    x = x.movedim(channel_dim, 1)
    return x.reshape(x.shape[0], x.shape[1], -1)


def top_inputs(values: Tensor, k: int = 10, *, channel_dim: int = 1,
               offset: int = 0) -> dict[str, Tensor]:
    """Per channel, the ``k`` inputs (axis 0) whose most extreme value ``|x̂|`` is largest.

    For each sample ``n`` and channel ``c`` the score is the entry of largest magnitude over
    the remaining axes (spatial positions); the signed value is returned. [HA20] Fig. 3
    picks the images whose activation in one kernel exceeds 14σ — this finds them.

    Returns ``{"values": (C, k'), "indices": (C, k')}`` with ``k' = min(k, N)``, sorted by
    decreasing ``|value|``; ``indices`` are ``offset + n``.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise ValueError(f"k must be a positive int, got {k!r}")
    v = _channel_last_view(values.detach(), channel_dim)
    per_sample = _extreme_per_sample(v)  # (N, C)
    kk = min(k, per_sample.shape[0])
    _, idx = per_sample.abs().topk(kk, dim=0)
    signed = per_sample.gather(0, idx)
    return {"values": signed.t().contiguous(), "indices": (idx + offset).t().contiguous()}


def _extreme_per_sample(v: Tensor) -> Tensor:
    """``(N, C, L)`` → ``(N, C)``: the signed entry with the largest magnitude over L."""
    pos = v.argmax(dim=2, keepdim=True)
    neg = v.argmin(dim=2, keepdim=True)
    vmax = v.gather(2, pos).squeeze(2)
    vmin = v.gather(2, neg).squeeze(2)
    return torch.where(vmax.abs() >= vmin.abs(), vmax, vmin)


def histogram(values, *, bins: int = 100, range: tuple[float, float] | None = None) -> dict:
    """Counts and edges of a histogram (numpy), as lists for JSON."""
    flat = _as_flat_float64(values).numpy()
    counts, edges = np.histogram(flat, bins=bins, range=range)
    return {"counts": counts.tolist(), "edges": edges.tolist()}


# ---------------------------------------------------------------------------------------
# Streaming accumulators (bounded memory)
# ---------------------------------------------------------------------------------------
class RunningMoments:
    """Exact count, mean, M2, M3, M4, min, max of a stream, merged batch by batch.

    Merging uses the pairwise update of central sums (Chan et al.; Pébay 2008), in float64,
    so the skewness and excess kurtosis equal those of the concatenated data.
    """

    def __init__(self) -> None:
        self.n = 0
        self.mean = 0.0
        self.m2 = 0.0
        self.m3 = 0.0
        self.m4 = 0.0
        self.min = math.inf
        self.max = -math.inf

    def update(self, values: Tensor) -> None:
        flat = values.detach().reshape(-1)
        if flat.numel() == 0:
            return
        if not flat.is_floating_point() or flat.dtype in (torch.float16, torch.bfloat16):
            flat = flat.float()
        nb, mb, m2b, m3b, m4b = _central_moments(flat)
        self.min = min(self.min, float(flat.min()))
        self.max = max(self.max, float(flat.max()))
        na = self.n
        if na == 0:
            self.n, self.mean, self.m2, self.m3, self.m4 = nb, mb, m2b, m3b, m4b
            return
        n = na + nb
        delta = mb - self.mean
        d_n = delta / n
        m2a, m3a, m4a = self.m2, self.m3, self.m4
        self.m4 = (m4a + m4b + delta * d_n ** 3 * na * nb * (na * na - na * nb + nb * nb)
                   + 6.0 * d_n * d_n * (na * na * m2b + nb * nb * m2a)
                   + 4.0 * d_n * (na * m3b - nb * m3a))
        self.m3 = (m3a + m3b + delta * d_n * d_n * na * nb * (na - nb)
                   + 3.0 * d_n * (na * m2b - nb * m2a))
        self.m2 = m2a + m2b + delta * d_n * na * nb
        self.mean += d_n * nb
        self.n = n

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.n) if self.n else float("nan")

    @property
    def skewness(self) -> float:
        return _shape_from_sums(self.n, self.m2, self.m3, self.m4)[0]

    @property
    def excess_kurtosis(self) -> float:
        return _shape_from_sums(self.n, self.m2, self.m3, self.m4)[1]


def _keep_last(slots: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """For repeated slots keep only the last (in stream order) value — Algorithm R semantics."""
    if slots.numel() <= 1:
        return slots, values
    rev_slots = slots.flip(0)
    uniq, inverse = torch.unique(rev_slots, return_inverse=True)
    first = torch.full((uniq.numel(),), rev_slots.numel(), dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(rev_slots.numel()), reduce="amin")
    return uniq, values.flip(0)[first]


def _algorithm_r_hits(start: int, m: int, capacity: int, rows: int,
                      gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Algorithm R for values ``start .. start+m−1`` of ``rows`` independent streams.

    Value ``t`` is accepted with probability ``capacity/(t+1)`` into a uniform slot — the
    same law as drawing ``j ~ U{0..t}`` and accepting ``j < capacity``. Returns the flat
    positions (row-major in ``(rows, m)``) of accepted values, in stream order per row, and
    their slots.
    """
    u = torch.rand(rows, m, generator=gen)
    thr = torch.arange(start + 1, start + m + 1, dtype=torch.float64).reciprocal_().mul_(capacity)
    thr = thr.to(torch.float32)
    hit = u < thr
    pos = hit.reshape(-1).nonzero().squeeze(1)
    frac = (u.reshape(-1)[pos] / thr[pos % m]).to(torch.float64)
    slot = (frac * capacity).long().clamp_(max=capacity - 1)
    return pos, slot


class Reservoir:
    """Uniform random sample of at most ``capacity`` values of a stream (Algorithm R).

    While fewer than ``capacity`` values were seen the reservoir holds all of them, in
    stream order; afterwards every value seen so far is in the sample with probability
    ``capacity / n``. Batches are processed vectorized: value ``t`` (0-based, global) draws
    ``j ~ U{0..t}`` and replaces slot ``j`` if ``j < capacity``; of several values drawing the
    same slot the last one wins, exactly as the sequential algorithm. Memory: ``capacity``
    float32 values.
    """

    def __init__(self, capacity: int, *, generator: torch.Generator | None = None) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity <= 0:
            raise ValueError(f"capacity must be a positive int, got {capacity!r}")
        self.capacity = capacity
        self.seen = 0
        self._data = torch.empty(capacity, dtype=torch.float32)
        self._gen = generator if generator is not None else torch.Generator().manual_seed(0)

    def update(self, values: Tensor) -> None:
        flat = values.detach().reshape(-1).to(device="cpu", dtype=torch.float32)
        m = flat.numel()
        if m == 0:
            return
        fill = max(0, min(self.capacity - self.seen, m))
        if fill:
            self._data[self.seen:self.seen + fill] = flat[:fill]
        if fill < m:
            rest = flat[fill:]
            pos, slot = _algorithm_r_hits(self.seen + fill, rest.numel(), self.capacity, 1, self._gen)
            slots, vals = _keep_last(slot, rest[pos])
            self._data[slots] = vals
        self.seen += m

    @property
    def values(self) -> Tensor:
        return self._data[: min(self.seen, self.capacity)]


class ChannelReservoir:
    """One :class:`Reservoir` per channel, vectorized (every channel sees the same count)."""

    def __init__(self, channels: int, capacity: int, *,
                 generator: torch.Generator | None = None) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity <= 0:
            raise ValueError(f"capacity must be a positive int, got {capacity!r}")
        self.channels, self.capacity, self.seen = channels, capacity, 0
        self._data = torch.empty(channels, capacity, dtype=torch.float32)
        self._gen = generator if generator is not None else torch.Generator().manual_seed(0)

    def update(self, values: Tensor) -> None:
        """``values``: ``(C, m)`` — the m new values of every channel, in stream order."""
        v = values.detach().to(device="cpu", dtype=torch.float32)
        if v.dim() != 2 or v.shape[0] != self.channels:
            raise ValueError(f"expected ({self.channels}, m) values, got {tuple(v.shape)}")
        m = v.shape[1]
        fill = max(0, min(self.capacity - self.seen, m))
        if fill:
            self._data[:, self.seen:self.seen + fill] = v[:, :fill]
        if fill < m:
            rest = v[:, fill:]
            pos, slot = _algorithm_r_hits(self.seen + fill, rest.shape[1], self.capacity,
                                          self.channels, self._gen)
            chan, col = pos // rest.shape[1], pos % rest.shape[1]
            slots, vals = _keep_last(chan * self.capacity + slot, rest[chan, col])
            self._data.view(-1)[slots] = vals
        self.seen += m

    def values(self, channel: int) -> Tensor:
        return self._data[channel, : min(self.seen, self.capacity)]


class ChannelTopK:
    """Per channel, the ``k`` samples with the most extreme value seen so far (global index)."""

    def __init__(self, channels: int, k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
            raise ValueError(f"top_k must be a positive int, got {k!r}")
        self.k = k
        self.values = torch.empty(channels, 0, dtype=torch.float32)
        self.indices = torch.empty(channels, 0, dtype=torch.long)

    def update(self, per_sample: Tensor, offset: int) -> None:
        """``per_sample``: ``(N, C)`` signed extreme value of each sample and channel."""
        vals = torch.cat([self.values, per_sample.t().float().cpu()], dim=1)
        idx = torch.arange(offset, offset + per_sample.shape[0]).unsqueeze(0).expand(vals.shape[0], -1)
        idx = torch.cat([self.indices, idx], dim=1)
        kk = min(self.k, vals.shape[1])
        _, order = vals.abs().topk(kk, dim=1)
        self.values = vals.gather(1, order)
        self.indices = idx.gather(1, order)
