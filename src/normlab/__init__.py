"""normlab: normalization layers for deep networks, and a lab to compare and understand them.

Layers (``normlab.nn``): filtered batch norm, filtered group/layer/instance norm, filter
response norm with TLU (and its group/layer forms), batch renormalization, TLU and
Affine-TLU. Math (``normlab.functional``), fast paths (``normlab.kernels``), and a registry
of spec strings (``normlab.create_norm("fbn:threshold=3", 64)``).
"""

from . import functional
from .nn import *  # noqa: F401,F403 - the public layers
from .nn import __all__ as _nn_all
from .registry import create_norm, create_norm_act, list_norms, parse_spec, register_norm
from .optim import fan_in_init_, init_norm_, param_groups
from .convert import ConversionReport, convert, fuse_for_inference
from .distributed import SyncBatchRenorm, SyncFilteredBatchNorm, convert_sync
from .precise_bn import precise_bn_

__version__ = "0.1.0"

__all__ = list(_nn_all) + [
    "functional", "create_norm", "create_norm_act", "list_norms", "parse_spec", "register_norm",
    "param_groups", "init_norm_", "fan_in_init_", "convert", "fuse_for_inference",
    "ConversionReport",
    "SyncFilteredBatchNorm", "SyncBatchRenorm", "convert_sync", "precise_bn_",
]
