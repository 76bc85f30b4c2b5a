"""The native row operators (normmatters::lp_row_norm_fwd / _bwd): float64 gradcheck of their autograd for every
norm and kind, agreement with the reference path (odd and minimal row lengths, 16-bit input), fake
implementations and input errors."""

import pytest
import torch
from row_cases import KINDS, NORMS, call, make, outputs_and_grads
from torch._subclasses.fake_tensor import FakeTensorMode

from normmatters.kernels import row_native

SHAPES = {"layer": (3, 8), "rms": (3, 8), "group": (2, 4, 3)}


@pytest.fixture(autouse=True, scope="module")
def _built():
    if not row_native.ensure():
        pytest.skip("no C++ compiler: the native row kernels cannot be built")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("norm", NORMS)
def test_gradcheck(kind, norm):
    x, params = make(kind, SHAPES[kind])
    inputs = tuple(t.clone().requires_grad_() for t in (x, *params))
    assert torch.autograd.gradcheck(lambda x, *p: call(kind, x, p, norm, "native"), inputs)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("n", [2, 37])  # the shortest row, and one that is no multiple of any vector width
def test_matches_reference_float64(kind, norm, n):
    shape = (5, 2, n) if kind == "group" else (5, n)  # group: 2 channels per row (2 groups of 1 channel)
    x, params = make(kind, shape)
    ref = outputs_and_grads(kind, x, params, norm, "reference")
    for a, b in zip(outputs_and_grads(kind, x, params, norm, "native"), ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2), (torch.float16, 4e-3)])
@pytest.mark.parametrize("norm", NORMS)
def test_16_and_32_bit_match_reference(norm, dtype, tol):
    x, params = make("layer", (6, 100), dtype)
    ref = outputs_and_grads("layer", x, params, norm, "reference")
    got = outputs_and_grads("layer", x, params, norm, "native")
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(1.0, b.abs().max().item()))
    y = call("layer", x, params, norm, "native")
    assert y.dtype == dtype


def test_statistics_in_float32_for_16_bit_input():
    x = torch.randn(4, 32).to(torch.bfloat16)
    _, mean, raw, aux = torch.ops.normmatters.lp_row_norm_fwd(x, None, None, "topk", True, 1.0, 1e-5, 3, 1, 1, 1)
    assert mean.dtype == raw.dtype == aux.dtype == torch.float32
    assert mean.shape == raw.shape == aux.shape == (4,)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("centered", [True, False])
def test_fake_matches_real(norm, centered):
    x, w = torch.randn(6, 12), torch.rand(12)
    real = torch.ops.normmatters.lp_row_norm_fwd(x, w, w, norm, centered, 1.0, 1e-5, 3, 2, 1, 1)
    with FakeTensorMode() as mode:
        fx, fw = mode.from_tensor(x), mode.from_tensor(w)
        fake = torch.ops.normmatters.lp_row_norm_fwd(fx, fw, fw, norm, centered, 1.0, 1e-5, 3, 2, 1, 1)
        gfake = torch.ops.normmatters.lp_row_norm_bwd(fx, fx, fw, fake[1], fake[2], fake[3], norm, centered, 1.0,
                                                      1e-5, 3, 2, 1, 1, True, True, False)
    greal = torch.ops.normmatters.lp_row_norm_bwd(x, x, w, *real[1:], norm, centered, 1.0, 1e-5, 3, 2, 1, 1, True,
                                                  True, False)
    for r, f in zip(real + greal, fake + gfake):
        assert (r.shape, r.dtype) == (f.shape, f.dtype)


def test_bad_input_names_the_operator():
    op = torch.ops.normmatters.lp_row_norm_fwd
    with pytest.raises(RuntimeError, match="lp_row_norm_fwd.*contiguous"):
        op(torch.randn(8, 6).t(), None, None, "l1", True, 1.0, 1e-5, 3, 1, 1, 1)
    with pytest.raises(RuntimeError, match="lp_row_norm_fwd.*float32"):
        op(torch.ones(4, 6, dtype=torch.int32), None, None, "l1", True, 1.0, 1e-5, 3, 1, 1, 1)
    with pytest.raises(RuntimeError, match="topk needs"):
        op(torch.randn(4, 6), None, None, "topk", True, 1.0, 1e-5, 65, 1, 1, 1)
    with pytest.raises(RuntimeError, match="norm must be one of"):
        op(torch.randn(4, 6), None, None, "mean", True, 1.0, 1e-5, 3, 1, 1, 1)
