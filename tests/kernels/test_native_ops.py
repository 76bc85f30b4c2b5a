"""The normmatters:: operators (normmatters.kernels.native_ops): schemas, fake impls and autograd checked by
torch.library.opcheck; the functional forward against the reference; the ops in torch.export graphs and inside a
torch.compile(fullgraph=True) model, matching eager."""

import re

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import normmatters as nm
from normmatters.estimators import get_estimator
from normmatters.kernels import native, native_ops

# the normmatters:: operators have CPU kernels only: CPU whatever the test device
pytestmark = pytest.mark.cpu_only

NORMS = ("mean", "l2", "l1", "linf", "range", "topk")


@pytest.fixture(autouse=True)
def _need_native():
    if not native.available():
        pytest.skip("native kernels unavailable (no C++ compiler)")


def _layout(kind, dtype=torch.float64):
    if kind == "channels":
        return torch.randn(4, 3, 5, 6, dtype=dtype)
    if kind == "channels_last":
        return torch.randn(4, 3, 5, 6, dtype=dtype).to(memory_format=torch.channels_last)
    return torch.randn(16, 5, dtype=dtype)  # (N, C): the rows kernels


def _args(x, norm):
    C = x.shape[1]
    n = x.numel() // C
    c = torch.tensor(get_estimator(norm).constant(n, k=3) if get_estimator(norm).divides else 1.0, dtype=x.dtype)
    w = (torch.rand(C, dtype=x.dtype) + 0.5).requires_grad_()
    b = torch.randn(C, dtype=x.dtype).requires_grad_()
    return x.clone().requires_grad_(), w, b, norm, c, 1e-5, 3


@pytest.mark.parametrize("kind", ["channels", "channels_last", "rows"])
@pytest.mark.parametrize("norm", NORMS)
def test_forward_op_passes_opcheck(norm, kind):
    """Schema, fake impl (shapes, strides, dtypes of all four outputs), autograd registration, and the
    AOT-dispatch tests (the op traced with static and dynamic shapes)."""
    torch.library.opcheck(torch.ops.normmatters.lp_batch_norm_fwd.default, _args(_layout(kind), norm))


@pytest.mark.parametrize("norm", ["l2", "range", "topk"])
def test_backward_update_and_out_ops_pass_opcheck(norm):
    for kind in ("channels", "rows"):
        x, w, b, _, c, eps, k = _args(_layout(kind), norm)
        x, w, b = x.detach(), w.detach(), b.detach()
        _, mean, raw, aux = native_ops.fwd(x, w, b, norm, c, eps, k)
        g = torch.randn_like(x)
        torch.library.opcheck(torch.ops.normmatters.lp_batch_norm_bwd.default,
                              (g, x, w, mean, raw, aux, norm, c, eps, k, True))
        C = x.shape[1]
        bufs = (torch.zeros(C, dtype=x.dtype), torch.ones(C, dtype=x.dtype), torch.zeros((), dtype=torch.long))
        torch.library.opcheck(torch.ops.normmatters.update_running_stats.default,
                              (mean, raw, *bufs, norm, c, 0.1, x.numel() // C))
        utils = ("test_schema", "test_faketensor")  # eager-only operators (caller-given outputs)
        torch.library.opcheck(torch.ops.normmatters.lp_batch_norm_fwd_out.default,
                              (x, w, b, norm, float(c), eps, k, torch.empty_like(x), *bufs, 0.1, 1.5, 0, 1, 2),
                              test_utils=utils)
        torch.library.opcheck(torch.ops.normmatters.lp_batch_norm_bwd_out.default,
                              (g, x, w, mean, raw, aux, None, norm, float(c), eps, k, True, True,
                               torch.empty_like(x), 0, 1, 2), test_utils=utils)


@pytest.mark.parametrize("kind", ["channels", "channels_last", "rows"])
@pytest.mark.parametrize("norm", NORMS)
def test_forward_op_matches_reference_values_and_gradients(norm, kind):
    x, w, b, _, c, eps, k = _args(_layout(kind), norm)
    y, mean, raw, _ = native_ops.fwd(x, w, b, norm, c, eps, k)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, w, b), g)
    xr, wr, br = (t.detach().clone().requires_grad_() for t in (x, w, b))
    yr = nm.lp_batch_norm(xr, None, None, wr, br, training=True, norm=norm, k=k, eps=eps)
    ref = torch.autograd.grad(yr, (xr, wr, br), g)
    torch.testing.assert_close(y, yr, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(mean, x.detach().transpose(0, 1).reshape(x.shape[1], -1).mean(1))
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("norm", NORMS)
def test_forward_op_gradcheck(norm):
    x, w, b, _, c, eps, k = _args(torch.randn(5, 2, 3, dtype=torch.float64) * 2, norm)
    torch.autograd.gradcheck(lambda x, w, b: native_ops.fwd(x, w, b, norm, c, eps, k)[0], (x, w, b))


def test_l2_gradient_is_finite_on_a_constant_channel():
    """The l2 backward takes σ̂ against sqrt(σ̂² + eps), not σ̂ alone (0/0 on a constant channel gave NaN)."""
    x, w, b, _, c, eps, k = _args(torch.randn(6, 3, 4, dtype=torch.float64), "l2")
    with torch.no_grad():
        x[:, 1] = 2.5
    y, *_ = native_ops.fwd(x, w, b, "l2", c, eps, k)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), torch.randn_like(y))
    assert torch.isfinite(gx).all() and torch.isfinite(gw).all() and torch.isfinite(gb).all()


def test_update_op_status_and_buffers():
    C = 3
    mean, raw = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 1.0, 2.0])
    rm, rv, nbt = torch.zeros(C), torch.ones(C), torch.zeros((), dtype=torch.long)
    status = native_ops.update_running_stats(mean, raw, rm, rv, nbt, "l1", torch.tensor(2.0), 0.5, 5)
    assert status.item() == 1 and nbt.item() == 1
    torch.testing.assert_close(rm, 0.5 * mean)
    torch.testing.assert_close(rv, 0.5 + 0.5 * (2.0 * raw) ** 2 * 5 / 4)
    before = (rm.clone(), rv.clone())
    status = native_ops.update_running_stats(torch.tensor([1.0, float("nan"), 0.0]), raw, rm, rv, nbt, "l1",
                                             torch.tensor(2.0), 0.5, 5)
    assert status.item() == 0 and nbt.item() == 1
    torch.testing.assert_close((rm, rv), before)


def test_bad_arguments_raise_clear_errors():
    x = torch.randn(4, 3, 5)
    w, b, c = torch.ones(3), torch.zeros(3), torch.tensor(1.0)
    with pytest.raises(RuntimeError, match="norm must be one of"):
        native_ops.fwd(x, w, b, "l3", c, 1e-5, 3)
    with pytest.raises(RuntimeError, match=r"expected weight of shape \(3\)"):
        native_ops.fwd(x, torch.ones(4), b, "l1", c, 1e-5, 3)
    with pytest.raises(RuntimeError, match="contiguous or channels-innermost"):
        native_ops.fwd(x.transpose(0, 2).contiguous().transpose(0, 2), w, b, "l1", c, 1e-5, 3)
    with pytest.raises(RuntimeError, match="topk needs"):
        native_ops.fwd(x, w, b, "topk", c, 1e-5, 65)


@pytest.mark.parametrize("norm", ["l1", "range", "topk"])
def test_training_export_graph_calls_the_operators(norm):
    layer = nm.LpBatchNorm2d(8, norm=norm).train()
    ep = torch.export.export(layer, (torch.randn(4, 8, 6, 6),))
    ops = set(re.findall(r"normmatters\.(\w+)", str(ep.graph_module.code)))
    assert "lp_batch_norm_fwd" in ops
    for sub in ep.graph_module.modules():  # the update runs in a no-grad submodule
        ops |= set(re.findall(r"normmatters\.(\w+)", str(getattr(sub, "code", ""))))
    assert "update_running_stats" in ops


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), nm.LpBatchNorm2d(8, norm="l1"),
                               torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1, bias=False),
                               nm.LpBatchNorm2d(8, norm="range"))


def test_fullgraph_compile_runs_the_operator_and_matches_eager():
    x = torch.randn(4, 3, 8, 8)
    eager, comp = _model(), _model()
    ce = torch.compile(comp, fullgraph=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        yc = ce(x)
        yc.square().sum().backward()
    names = {e.name for e in prof.events()}
    assert "normmatters::lp_batch_norm_fwd" in names and "normmatters::lp_batch_norm_bwd" in names
    ye = eager(x)
    ye.square().sum().backward()
    torch.testing.assert_close(yc, ye, rtol=1e-4, atol=1e-4)
    for (name, pe), pc in zip(eager.named_parameters(), comp.parameters()):
        torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-3, atol=1e-4, msg=name)
    for (name, be), bc in zip(eager.named_buffers(), comp.buffers()):
        torch.testing.assert_close(bc, be, rtol=1e-5, atol=1e-6, msg=name)
