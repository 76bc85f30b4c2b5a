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


def _op_args(norm="l1", centered=True, dtype=torch.float64, R=3, n=8):
    x = torch.randn(R, n, dtype=dtype)
    w, b = torch.randn(n, dtype=dtype), torch.randn(n, dtype=dtype)
    return x, w, b, (norm, centered, 1.3, 1e-5, 3, 1, 1, 1)


@pytest.mark.parametrize("norm,centered", [("l1", True), ("topk", False)])
def test_opcheck_every_operator(norm, centered):
    from torch.library import opcheck

    x, w, b, rest = _op_args(norm, centered, torch.float32)
    opcheck(torch.ops.normmatters.lp_row_norm.default, (x.reshape(3, 2, 4), w, b, 8, *rest))
    opcheck(torch.ops.normmatters.lp_row_norm_fwd.default, (x.requires_grad_(), w.requires_grad_(), None, *rest))
    _, mean, raw, aux = torch.ops.normmatters.lp_row_norm_fwd(x.detach(), w, None, *rest)
    opcheck(torch.ops.normmatters.lp_row_norm_bwd.default,
            (torch.randn_like(x), x.detach(), w.detach(), mean, raw, aux, *rest, True, True, True))


@pytest.mark.parametrize("with_w,with_b", [(True, False), (False, True), (False, False)])
def test_gradcheck_with_absent_affine(with_w, with_b):
    x, w, b, rest = _op_args()
    inputs = [x.requires_grad_()] + [t.requires_grad_() for t, on in ((w, with_w), (b, with_b)) if on]

    def f(x, *p):
        it = iter(p)
        return torch.ops.normmatters.lp_row_norm(x, next(it) if with_w else None, next(it) if with_b else None, 8,
                                                 *rest)
    assert torch.autograd.gradcheck(f, tuple(inputs))


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("centered", [True, False])
def test_composite_kernel_matches_native(norm, centered):
    x, w, b, (_, _, c, eps, k, m, g, s) = _op_args(norm, centered)
    rest = (norm, centered, c, eps, k, m, g, s)
    native = torch.ops.normmatters.lp_row_norm_fwd(x, w, b, *rest)
    composite = row_native._fwd_composite(x, w, b, *rest)
    for a, e in zip(composite, native):
        torch.testing.assert_close(a, e)
    gy = torch.randn_like(x)
    args = (gy, x, w, *native[1:], *rest, True, True, True)
    for a, e in zip(row_native._bwd_composite(*args), torch.ops.normmatters.lp_row_norm_bwd(*args)):
        torch.testing.assert_close(a, e)


def test_empty_rows():
    x = torch.randn(0, 8, dtype=torch.float64, requires_grad=True)
    y = torch.ops.normmatters.lp_row_norm(x, None, None, 8, "l1", True, 1.0, 1e-5, 3, 1, 1, 1)
    y.sum().backward()
    assert y.shape == (0, 8) and x.grad.shape == (0, 8)
