import re
import warnings

import pytest
import torch
import torch.nn.functional as F

import normmatters as nm
from normmatters.estimators import get_estimator
from normmatters.functional import NonFiniteBatchError
from normmatters.functional import lp_batch_norm as _public

NORMS = ["l2", "l1", "linf", "topk", "range", "mean"]


def lp_batch_norm(*args, **kwargs):
    """The math of this module's tests, on the plain reference path (each fast path is checked against it in
    tests/kernels; the default path of the public function below)."""
    return _public(*args, impl="reference", **kwargs)



def _buffers(c, dtype=torch.float64):
    return torch.zeros(c, dtype=dtype), torch.ones(c, dtype=dtype)


@pytest.mark.parametrize("norm,opts", [
    ("l2", {}), ("l1", {}), ("linf", {}), ("topk", {"k": 3}), ("range", {}), ("range", {"chunks": 2}),
    ("mean", {}), ("l1", {"ghost_batch_size": 2}), ("topk", {"k": 2, "ghost_batch_size": 2}),
])
def test_gradcheck_float64(norm, opts):
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64, requires_grad=True) + 0.5
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        return lp_batch_norm(x, None, None, w, b, training=True, norm=norm, **opts)

    assert torch.autograd.gradcheck(f, (x, w, b))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("momentum", [0.1, 0.5])
def test_l2_equals_torch_batch_norm(dtype, tol, momentum):
    x = torch.randn(8, 5, 4, 3, dtype=dtype, requires_grad=True)
    w = (torch.rand(5, dtype=dtype) + 0.5).requires_grad_()
    b = torch.randn(5, dtype=dtype, requires_grad=True)
    rm1, rv1 = torch.randn(5, dtype=dtype), torch.rand(5, dtype=dtype) + 0.5
    rm2, rv2 = rm1.clone(), rv1.clone()
    gy = torch.randn_like(x)
    y1 = F.batch_norm(x, rm1, rv1, w, b, True, momentum, 1e-5)
    g1 = torch.autograd.grad(y1, (x, w, b), gy)
    y2 = lp_batch_norm(x, rm2, rv2, w, b, True, momentum, 1e-5, norm="l2")
    g2 = torch.autograd.grad(y2, (x, w, b), gy)
    torch.testing.assert_close(y2, y1, atol=tol, rtol=tol)
    for a, e in zip(g2, g1):
        torch.testing.assert_close(a, e, atol=tol, rtol=tol)
    torch.testing.assert_close(rm2, rm1, atol=tol, rtol=tol)
    torch.testing.assert_close(rv2, rv1, atol=tol, rtol=tol)


@pytest.mark.parametrize("norm", NORMS)
def test_output_formula(norm):
    x = torch.randn(6, 4, 3, dtype=torch.float64)
    w, b = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    y = lp_batch_norm(x, None, None, w, b, True, norm=norm, k=4, eps=1e-5)
    xc = x.transpose(0, 1).reshape(4, -1)
    mean = xc.mean(1)
    est = get_estimator(norm)
    d = (x - mean[None, :, None])
    if est.divides:
        sigma = est.statistic(xc, mean, (1,), xc.shape[1], k=4)
        d = d / (sigma.square() + 1e-5).sqrt()[None, :, None]
    torch.testing.assert_close(y, d * w[None, :, None] + b[None, :, None])


@pytest.mark.parametrize("norm", NORMS)
def test_running_statistics(norm):
    x = torch.randn(10, 3, 4, dtype=torch.float64) * 2 + 1
    rm, rv = torch.full((3,), 0.5, dtype=torch.float64), torch.full((3,), 2.0, dtype=torch.float64)
    nbt = torch.tensor(0)
    lp_batch_norm(x, rm, rv, training=True, momentum=0.25, norm=norm, num_batches_tracked=nbt)
    xc = x.transpose(0, 1).reshape(3, -1)
    n = xc.shape[1]
    torch.testing.assert_close(rm, 0.75 * 0.5 + 0.25 * xc.mean(1))
    est = get_estimator(norm)
    if est.divides:
        sigma = est.statistic(xc, xc.mean(1), (1,), n)
        torch.testing.assert_close(rv, 0.75 * 2.0 + 0.25 * sigma.square() * n / (n - 1))
    else:
        torch.testing.assert_close(rv, torch.full((3,), 2.0, dtype=torch.float64))
    assert nbt.item() == 1


@pytest.mark.parametrize("norm", NORMS)
def test_eval_uses_running_statistics(norm):
    x = torch.randn(4, 3, 5, 5)
    rm, rv = torch.randn(3), torch.rand(3) + 0.5
    w, b = torch.randn(3), torch.randn(3)
    y = lp_batch_norm(x, rm, rv, w, b, training=False, norm=norm)
    if norm == "mean":
        expected = (x - rm[:, None, None]) * w[:, None, None] + b[:, None, None]
    else:
        expected = F.batch_norm(x, rm, rv, w, b, False, 0.0, 1e-5)
    torch.testing.assert_close(y, expected)


@pytest.mark.parametrize("norm", ["l2", "l1", "range", "topk"])
def test_ghost_batches_normalize_each_group(norm):
    x = torch.randn(12, 3, 4, dtype=torch.float64)
    rm, rv = _buffers(3)
    y = lp_batch_norm(x, rm, rv, training=True, momentum=1.0, norm=norm, k=3, ghost_batch_size=4)
    parts, means, vars_ = [], [], []
    for xg in x.split(4):
        rmg, rvg = _buffers(3)
        parts.append(lp_batch_norm(xg, rmg, rvg, training=True, momentum=1.0, norm=norm, k=3))
        means.append(rmg)
        vars_.append(rvg)
    torch.testing.assert_close(y, torch.cat(parts))
    # running statistics updated once per call, with the average over ghost batches
    torch.testing.assert_close(rm, torch.stack(means).mean(0))
    torch.testing.assert_close(rv, torch.stack(vars_).mean(0))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_batch_raises_and_keeps_buffers(bad):
    x = torch.randn(8, 4, 3, 3)
    x[2, 1, 0, 0] = bad
    rm, rv, nbt = torch.randn(4), torch.rand(4) + 0.5, torch.tensor(7)
    before = rm.clone(), rv.clone(), nbt.clone()
    with pytest.raises(NonFiniteBatchError, match="lp_batch_norm.*non-finite.*unchanged"):
        lp_batch_norm(x, rm, rv, training=True, norm="l1", num_batches_tracked=nbt, nonfinite="raise")
    for a, e in zip((rm, rv, nbt), before):
        assert torch.equal(a, e)


@pytest.mark.parametrize("impl", [None, "reference"])
def test_nonfinite_default_skips_silently_and_keeps_buffers(impl):
    """The default ("skip") and "ignore" leave every buffer as it was, without a warning or an error."""
    x = torch.randn(8, 4, 3, 3)
    x[0, 0, 0, 1] = float("nan")
    rm, rv, nbt = torch.zeros(4), torch.ones(4), torch.tensor(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _public(x, rm, rv, training=True, norm="range", num_batches_tracked=nbt, impl=impl)
        _public(x, rm, rv, training=True, norm="range", nonfinite="ignore", impl=impl)
    assert torch.equal(rm, torch.zeros(4)) and torch.equal(rv, torch.ones(4)) and int(nbt) == 3


@pytest.mark.parametrize("norm", ["l2", "range"])
def test_public_function_runs_the_layers_fast_path(norm):
    """nm.lp_batch_norm on its default path gives the reference's output, gradients and buffers, and the
    layer's (the same dispatch)."""
    x = torch.randn(8, 4, 5, 5, dtype=torch.float64) * 2 + 1
    w = torch.rand(4, dtype=torch.float64) + 0.5
    b = torch.randn(4, dtype=torch.float64)
    outs = []
    for impl in (None, "reference"):
        xi, wi, bi = (t.clone().requires_grad_() for t in (x, w, b))
        rm, rv = _buffers(4)
        y = _public(xi, rm, rv, wi, bi, training=True, norm=norm, impl=impl)
        y.backward(torch.cos(torch.arange(y.numel(), dtype=y.dtype)).reshape(y.shape))
        outs.append((y.detach(), xi.grad, wi.grad, bi.grad, rm, rv))
    for a, e in zip(*outs):
        torch.testing.assert_close(a, e)
    layer = nm.LpBatchNorm2d(4, norm=norm, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(w), layer.bias.copy_(b)
    torch.testing.assert_close(layer(x), outs[0][0])
    torch.testing.assert_close(layer.running_var, outs[0][5])


@pytest.mark.parametrize("name,kwargs,found", [
    ("weight", {"weight": torch.ones(5)}, "(5,)"), ("bias", {"bias": torch.ones(2, 2)}, "(2, 2)"),
    ("running_mean", {"running_mean": torch.zeros(3)}, "(3,)"), ("running_var", {"running_var": torch.ones(1)}, "(1,)"),
])
def test_wrong_sized_vectors_name_the_argument(name, kwargs, found):
    args = {"running_mean": torch.zeros(4), "running_var": torch.ones(4), **kwargs}
    with pytest.raises(ValueError, match=rf"lp_batch_norm: expected {name} of shape \(4,\).*got {re.escape(found)}"):
        _public(torch.randn(8, 4, 3), args["running_mean"], args["running_var"], args.get("weight"),
                args.get("bias"), training=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm", ["l2", "l1", "linf", "range"])
def test_half_inputs_accumulate_in_float32(dtype, norm):
    x = torch.randn(16, 4, 6, 6) * 3 + 2
    rm, rv = torch.zeros(4), torch.ones(4)
    rm32, rv32 = torch.zeros(4), torch.ones(4)
    y = lp_batch_norm(x.to(dtype), rm, rv, training=True, norm=norm)
    y32 = lp_batch_norm(x.to(dtype).float(), rm32, rv32, training=True, norm=norm)
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), y32.to(dtype).float())
    torch.testing.assert_close(rm, rm32)
    torch.testing.assert_close(rv, rv32)


def test_channels_last_preserved():
    x = torch.randn(4, 6, 5, 5).to(memory_format=torch.channels_last)
    y = lp_batch_norm(x, None, None, training=True, norm="l1")
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, lp_batch_norm(x.contiguous(), None, None, training=True, norm="l1"))


@pytest.mark.parametrize("kwargs,match", [
    ({"norm": "l7"}, "unknown norm 'l7'"),
    ({"norm": "topk", "k": 50}, "k=50, n=8"),
    ({"norm": "range", "chunks": 3}, "chunks=3 must divide the batch size, got batch size 4"),
    ({"norm": "l1", "chunks": 2}, "chunks is an option of norm='range' only"),
    ({"norm": "l1", "ghost_batch_size": 3}, "ghost_batch_size=3 must divide the batch size, got batch size 4"),
    ({"norm": "l1", "nonfinite": "explode"}, "nonfinite must be one of"),
])
def test_option_errors(kwargs, match):
    x = torch.randn(4, 2, 2)
    with pytest.raises(ValueError, match=match):
        lp_batch_norm(x, None, None, training=True, **kwargs)


def test_input_errors():
    with pytest.raises(TypeError, match="floating-point input, got dtype torch.int64"):
        lp_batch_norm(torch.ones(4, 2, dtype=torch.long), None, None, training=True)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        lp_batch_norm(torch.randn(1, 3), None, None, training=True)
    with pytest.raises(ValueError, match="more than 1 value per channel.*ghost_batch_size=1"):
        lp_batch_norm(torch.randn(4, 3), None, None, training=True, ghost_batch_size=1)
    with pytest.raises(ValueError, match="at least 2 dims"):
        lp_batch_norm(torch.randn(4), None, None, training=True)
    with pytest.raises(ValueError, match="eval mode needs running statistics"):
        lp_batch_norm(torch.randn(4, 3), None, None, training=False)
