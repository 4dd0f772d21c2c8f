"""torch.compile works on models built from normlab's layers (values and gradients)."""

import pytest
import torch
from torch import nn

import normlab


@pytest.mark.slow
def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), normlab.FilteredBatchNorm2d(4, threshold=2.0),
                          nn.ReLU(), nn.Conv2d(4, 4, 3), normlab.FilterResponseNorm2d(4)).double()
    compiled = torch.compile(model, backend="aot_eager")
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    x[0, 0, 0, 0] = 30.0
    eager_state = {k: v.clone() for k, v in model.state_dict().items()}
    y_c = compiled(x)
    g_c = torch.autograd.grad(y_c.sum(), model[0].weight)[0]
    compiled_state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(eager_state)
    y_e = model(x)
    g_e = torch.autograd.grad(y_e.sum(), model[0].weight)[0]
    torch.testing.assert_close(y_c, y_e)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(compiled_state[k], v)
    torch.testing.assert_close(g_c, g_e)
