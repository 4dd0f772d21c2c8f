r"""The fold math of :func:`normlab.fuse_for_inference` and :func:`normlab.convert`: tensors in,
tensors out (like ``torch.nn.utils.fusion.fuse_conv_bn_weights``).

Nothing here touches a module: :mod:`normlab.fuse` and :mod:`normlab.convert` read the
tensors from the layers, call these functions, and write the results back (the module
surgery). Every function computes in float64 and returns float64 tensors; callers cast.

* :func:`eval_scale_shift` — a batch norm in eval mode as a per-channel affine map
  ``y = s·x + t`` ([IS15] Alg. 2, step 11):
  ``s = w / sqrt(σ²_run + ε)``, ``t = b − μ_run·s``.
* :func:`fold_after` — ``norm(layer(x))`` → ``layer'(x)``: ``W' = s·W`` per output channel,
  ``b' = s·b + t``.
* :func:`fold_before` — ``layer(s·x + t)`` → ``layer'(x)``: ``W' = W·s`` along the input
  channels, ``b' = b + Σ_{c, taps} W·t`` (exact wherever every output sums over every tap).
* :func:`tail_to_alt_scale`, :func:`tail_to_scaled` — a per-channel tail ``y = w·x̂ + b``
  written into the revisiting-BN forms ``γ(γ₀x̂ + β)`` (γ₀ = 1) and ``γ·S₀·x̂ + β``
  ([DF21] eq. 26–29).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["eval_scale_shift", "fold_after", "fold_before", "tail_to_alt_scale",
           "tail_to_scaled"]

_F64 = torch.float64


def _f64(t: Tensor) -> Tensor:
    return t.detach().to(_F64)


def eval_scale_shift(running_mean: Tensor, running_var: Tensor, eps: float,
                     weight: Tensor | None = None, bias: Tensor | None = None
                     ) -> tuple[Tensor, Tensor]:
    r"""``(s, t)`` per channel with ``BN_eval(x) = s·x + t`` (float64).

    ``s = w / sqrt(σ²_run + ε)``, ``t = b − μ_run·s``; ``weight``/``bias`` ``None`` mean
    ``w = 1``/``b = 0``. This is the eval-mode tail of every batch-statistics layer: pass
    the layer's *effective* per-channel ``(w, b)`` (:func:`normlab.taxonomy.affine_tail`).
    """
    scale = torch.rsqrt(_f64(running_var) + eps)
    if weight is not None:
        scale = scale * _f64(weight)
    shift = -_f64(running_mean) * scale
    if bias is not None:
        shift = shift + _f64(bias)
    return scale, shift


def fold_after(weight: Tensor, bias: Tensor | None, scale: Tensor, shift: Tensor
               ) -> tuple[Tensor, Tensor]:
    r"""``(W', b')`` of a Linear/Conv followed by ``y = s·y + t`` per output channel (float64).

    ``weight`` is ``(out, ...)`` (Linear ``(out, in)``, Conv ``(out, in/g, *k)``);
    ``W'[o] = s_o·W[o]``, ``b'_o = s_o·b_o + t_o`` (``b = 0`` when ``bias`` is ``None``).
    """
    w = _f64(weight)
    s, t = _f64(scale), _f64(shift)
    if s.numel() != w.shape[0] or t.numel() != w.shape[0]:
        raise ValueError(f"scale and shift need {w.shape[0]} values (one per output channel), "
                         f"got {s.numel()} and {t.numel()}")
    b = _f64(bias) if bias is not None else torch.zeros_like(s)
    return w * s.view([-1] + [1] * (w.dim() - 1)), b * s + t


def fold_before(weight: Tensor, bias: Tensor | None, scale: Tensor, shift: Tensor, *,
                layout: str, groups: int = 1) -> tuple[Tensor, Tensor]:
    r"""``(W', b')`` of a layer whose input first goes through ``x ↦ s·x + t`` per channel.

    ``W' = W·s`` along the input-channel axis, ``b'_o = b_o + Σ_{c, taps} W[o, c, taps]·t_c``
    (float64; ``b = 0`` when ``bias`` is ``None``). Exact for a Linear, and for a conv whose
    every output position sums over every tap of the shifted input (no zero padding, or a
    padding of the input by the value that maps to 0 — the caller's business).

    Args:
        weight: the layer's weight.
        layout: ``"linear"`` (``(out, in)``), ``"conv"`` (``(out, in/g, *k)``: input channel
            ``⌊o/(out/g)⌋·in/g + j`` for output channel ``o``) or ``"conv_transpose"``
            (``(in, out/g, *k)``).
        groups: the conv's groups.
    """
    w = _f64(weight)
    s, t = _f64(scale), _f64(shift)
    if layout == "linear":
        s_w, t_w = s.view(1, -1), t.view(1, -1)
        term = (w * t_w).sum(1)
    elif layout == "conv_transpose":
        view = [-1] + [1] * (w.dim() - 1)
        s_w, t_w = s.view(view), t.view(view)
        per_pair = (w * t_w).flatten(2).sum(2)                     # (in, out/g)
        term = per_pair.view(groups, -1, per_pair.shape[1]).sum(1).reshape(-1)
    elif layout == "conv":
        out, in_g = w.shape[0], w.shape[1]
        view = [out, in_g] + [1] * (w.dim() - 2)

        def per_weight(v: Tensor) -> Tensor:
            return v.view(groups, 1, in_g).expand(groups, out // groups, in_g).reshape(view)

        s_w, t_w = per_weight(s), per_weight(t)
        term = (w * t_w).flatten(1).sum(1)
    else:
        raise ValueError(f"layout must be 'linear', 'conv' or 'conv_transpose', got {layout!r}")
    b = _f64(bias) if bias is not None else torch.zeros_like(term)
    return w * s_w, b + term


def tail_to_alt_scale(w: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""``(γ, β, lost)`` with ``γ(x̂ + β) = w·x̂ + b`` (A1; A2 with γ₀ = 1), float64.

    ``γ = w``, ``β = b / w``; a channel with ``w = 0`` gets ``β = 0``, and ``lost`` marks the
    channels where that changes the output (``w = 0``, ``b ≠ 0``: ``γ(x̂ + β)`` cannot output
    a nonzero constant).
    """
    w, b = _f64(w), _f64(b)
    zero = w == 0
    beta = torch.where(zero, torch.zeros_like(b), b / torch.where(zero, torch.ones_like(w), w))
    return w, beta, zero & (b != 0)


def tail_to_scaled(w: Tensor, calib_bias: Tensor) -> Tensor:
    r"""``γ`` with ``γ·S₀ = w``, ``S₀ = sigmoid(w_b)`` (RBN/IEBN while ``w_v = 0``), float64."""
    return _f64(w) / torch.sigmoid(_f64(calib_bias))
