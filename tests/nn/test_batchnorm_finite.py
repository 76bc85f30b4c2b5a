"""Property: a finite batch at any scale 1e-30…1e30 never gives a non-finite output, gradient or running buffer,
for any norm, on the native, eager (the compiled formulas, op by op) and reference paths."""

import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from normmatters.nn import LpBatchNorm2d

NORMS = ["l2", "l1", "linf", "topk", "range", "mean"]


@pytest.mark.parametrize("impl", ["native", "eager", "reference"])
@pytest.mark.parametrize("norm", NORMS)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(exponent=st.floats(-30, 30), offset=st.floats(-3, 3), seed=st.integers(0, 2**16),
       constant_channel=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
       channels_last=st.booleans())
def test_finite_input_never_gives_nonfinite(impl, norm, exponent, offset, seed, constant_channel, dtype,
                                            channels_last, device):
    gen = torch.Generator().manual_seed(seed)
    scale = 10.0 ** exponent
    x = ((torch.randn(4, 3, 3, 3, generator=gen, dtype=torch.float64) + offset) * scale).to(dtype)
    if constant_channel:
        x[:, 1] = x[0, 1, 0, 0]
    assert torch.isfinite(x).all()
    x = x.to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    m = LpBatchNorm2d(3, norm=norm, k=3, impl=impl, dtype=pdtype, device=device)
    xr = x.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (an unrepresentable running variance warns; buffers are checked below)
        y = m(xr)
        y.backward(torch.randn(y.shape, generator=gen, dtype=torch.float64).to(device, dtype))
    assert torch.isfinite(y).all()
    assert torch.isfinite(xr.grad).all()
    assert torch.isfinite(m.weight.grad).all() and torch.isfinite(m.bias.grad).all()
    assert torch.isfinite(m.running_mean).all() and torch.isfinite(m.running_var).all()
