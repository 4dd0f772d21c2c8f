"""Fast paths for normalization, each checked against :mod:`normlab.functional`.

:func:`normalize_affine` is the one entry point the modules call; it picks the best
implementation for the input's device and dtype. ``analytic`` is the portable reference
(an autograd Function with the exact backward) that every other path must match.
"""

from .analytic import NormalizeAffineFunction, normalize_affine

__all__ = ["normalize_affine", "NormalizeAffineFunction"]
