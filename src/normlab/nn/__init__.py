"""Drop-in ``torch.nn`` modules for every normalization of the papers in docs/references.md."""

from .activation import ACTIVATIONS, TLU, AffineTLU, NormActivation, make_activation
from .alternatives import (
    AltScaleBatchNorm1d,
    AltScaleBatchNorm2d,
    AltScaleBatchNorm3d,
    ScaleCalibratedBatchNorm1d,
    ScaleCalibratedBatchNorm2d,
    ScaleCalibratedBatchNorm3d,
)
from .batch import (
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    FilteredBatchNorm1d,
    FilteredBatchNorm2d,
    FilteredBatchNorm3d,
)
from .group import (
    FilteredGroupNorm,
    FilteredInstanceNorm1d,
    FilteredInstanceNorm2d,
    FilteredInstanceNorm3d,
    FilteredLayerNorm,
)
from .input_norm import (
    FixedInputNorm,
    InputNorm,
    OfflineInputNorm,
    activation_std,
    with_input_norm,
)
from .padding import ConstantChannelPad
from .response import (
    FilterResponseNorm1d,
    FilterResponseNorm2d,
    FilterResponseNorm3d,
    GroupFilterResponseNorm,
    LayerFilterResponseNorm,
)

__all__ = [
    "ACTIVATIONS", "TLU", "AffineTLU", "NormActivation", "make_activation",
    "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d",
    "FilteredBatchNorm1d", "FilteredBatchNorm2d", "FilteredBatchNorm3d",
    "FilteredGroupNorm", "FilteredInstanceNorm1d", "FilteredInstanceNorm2d",
    "FilteredInstanceNorm3d", "FilteredLayerNorm",
    "FilterResponseNorm1d", "FilterResponseNorm2d", "FilterResponseNorm3d",
    "GroupFilterResponseNorm", "LayerFilterResponseNorm",
    "AltScaleBatchNorm1d", "AltScaleBatchNorm2d", "AltScaleBatchNorm3d",
    "ScaleCalibratedBatchNorm1d", "ScaleCalibratedBatchNorm2d", "ScaleCalibratedBatchNorm3d",
    "InputNorm", "FixedInputNorm", "OfflineInputNorm", "with_input_norm", "activation_std",
    "ConstantChannelPad",
]
