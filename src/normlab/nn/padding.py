"""Padding with a constant per channel: what folding an input norm into a padded conv needs.

:func:`normlab.fuse_for_inference` folds an eval-mode :class:`~normlab.InputNorm`
``y = s·x + t`` (per channel) into the convolution that follows it. A conv with zero padding
pads ``y`` with 0; after folding, the conv sees ``x`` instead, and the value of ``x`` that
the norm maps to 0 is ``x₀ = −t/s`` — InputNorm's running mean. Padding ``x`` with ``x₀``
per channel, then running the folded conv without padding, is therefore exact:
``conv_W(pad₀(s·x + t)) = conv_{W·s}(pad_{x₀}(x)) + Σ W·t``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

__all__ = ["ConstantChannelPad"]


class ConstantChannelPad(nn.Module):
    r"""Pad the spatial dims of ``(N, C, *spatial)`` input with a per-channel constant.

    ``y[:, c] = value[c]`` in the padded border and ``y = x`` inside:
    ``y.shape[2 + i] = x.shape[2 + i] + before_i + after_i``. Inside values are selected
    from ``x``, so they are bit-identical to it; the output keeps ``x``'s memory format (as
    ``torch.nn.functional.pad``). Plain torch ops: FX, ``torch.export`` and both ONNX
    exporters take it.

    Args:
        padding: one ``(before, after)`` pair of non-negative ints per spatial dim, in the
            order of the dims (``((top, bottom), (left, right))`` for images).
        value: the per-channel constants, shape ``(C,)`` (a buffer; it follows ``.to()``).

    Example:
        >>> pad = ConstantChannelPad(((1, 1), (2, 0)), torch.tensor([0.5, -1.0]))
        >>> pad(torch.zeros(1, 2, 3, 3)).shape
        torch.Size([1, 2, 5, 5])
    """

    def __init__(self, padding: Sequence[Sequence[int]], value: Tensor) -> None:
        super().__init__()
        pairs = []
        for pair in padding:
            if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2:
                raise ValueError(f"padding must be one (before, after) pair per spatial dim, "
                                 f"got {padding!r}")
            for amount in pair:
                if isinstance(amount, bool) or not isinstance(amount, int) or amount < 0:
                    raise ValueError(f"padding amounts must be non-negative ints, got {amount!r} "
                                     f"in {padding!r}")
            pairs.append((int(pair[0]), int(pair[1])))
        if not pairs:
            raise ValueError(f"padding needs at least one spatial dim, got {padding!r}")
        if not isinstance(value, Tensor) or not value.is_floating_point() or value.dim() != 1 \
                or value.numel() == 0:
            raise TypeError(f"value must be a non-empty 1-D floating tensor (one constant per "
                            f"channel), got {value!r}")
        self.padding: tuple[tuple[int, int], ...] = tuple(pairs)
        self.register_buffer("value", value.detach().clone())

    @property
    def num_channels(self) -> int:
        return self.value.numel()

    def extra_repr(self) -> str:
        return f"{self.num_channels}, padding={self.padding}"

    def forward(self, x: Tensor) -> Tensor:
        return pad_channels(x, self.value, self.padding)


def pad_channels(x: Tensor, value: Tensor, padding: tuple[tuple[int, int], ...]) -> Tensor:
    """:class:`ConstantChannelPad`'s computation: pad ``x`` with ``value[c]`` per channel."""
    spatial = len(padding)
    channels = value.numel()
    if not isinstance(x, Tensor):
        raise TypeError(f"ConstantChannelPad expects a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2 + spatial or x.shape[1] != channels:
        raise ValueError(f"ConstantChannelPad was built for (N, {channels}, "
                         f"{spatial} spatial dims) input, got shape {tuple(x.shape)}")
    # zero-padded x, then the constant wherever the padding is: plain ops (both ONNX
    # exporters take them), and x's values selected, not recomputed, so they stay exact
    flat = [amount for pair in reversed(padding) for amount in pair]
    padded = TF.pad(x, flat)
    inside = TF.pad(torch.ones((1, 1) + tuple(x.shape[2:]), dtype=torch.bool, device=x.device),
                    flat, value=False)
    return torch.where(inside, padded, value.to(x.dtype).view([1, -1] + [1] * spatial))


torch.fx.wrap("pad_channels")  # a node in torch.fx traces (see normlab.nn._common)
