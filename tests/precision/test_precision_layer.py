"""emulated_lp_batch_norm (the precision= layer path): forward emulated, backward straight-through."""

import pytest
import torch

from normmatters.functional import NonFiniteBatchError, lp_batch_norm
from normmatters.precision.layer import emulated_lp_batch_norm, quantize_uniform


def test_quantize_uniform_rounds_to_the_grid_and_clamps():
    x = torch.tensor([-1.0, 0.0, 0.26, 0.5, 2.0], dtype=torch.float64)
    q = quantize_uniform(x, 2, 0.0, 0.75)  # grid 0, 0.25, 0.5, 0.75
    assert q.tolist() == [0.0, 0.0, 0.25, 0.5, 0.75]
    assert torch.equal(quantize_uniform(x, 8, 1.0, 1.0), x)  # empty range: unchanged


@pytest.mark.parametrize("norm", ["l1", "range", "l2"])
def test_fp32_emulation_matches_the_reference_and_gradients_are_the_references(norm):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 4, 4, generator=g)
    w, b = torch.rand(3, generator=g) + 0.5, torch.randn(3, generator=g)
    xe, xr = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    rm_e, rv_e, rm_r, rv_r = torch.zeros(3), torch.ones(3), torch.zeros(3), torch.ones(3)
    ye = emulated_lp_batch_norm(xe, rm_e, rv_e, w, b, training=True, norm=norm, precision="fp32")
    yr = lp_batch_norm(xr, rm_r, rv_r, w, b, training=True, norm=norm)
    torch.testing.assert_close(ye, yr, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rm_e, rm_r, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(rv_e, rv_r, atol=1e-5, rtol=1e-5)
    gy = torch.randn(ye.shape, generator=g)
    ye.backward(gy)
    yr.backward(gy)
    torch.testing.assert_close(xe.grad, xr.grad)


def test_fp16_overflow_of_the_l2_statistic_is_reported_with_its_step():
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(1)) * 1e3
    with pytest.raises(NonFiniteBatchError, match="emulated fp16 statistics are non-finite \\(square: overflow"):
        emulated_lp_batch_norm(x, None, None, training=True, norm="l2", precision="fp16", nonfinite="raise")
    # l1 has no square: the same batch stays finite in fp16
    y = emulated_lp_batch_norm(x, None, None, training=True, norm="l1", precision="fp16")
    assert torch.isfinite(y).all()


def test_unknown_precision_names_the_layer():
    with pytest.raises(ValueError, match="emulated_lp_batch_norm"):
        emulated_lp_batch_norm(torch.randn(4, 2), None, None, training=True, precision="fp7")
