"""Layers on the lean kernels vs the same layers on the reference path: modes, buffers, non-finite
batches, saved memory, the impl switch and the compile fallback."""

from __future__ import annotations

import copy
import logging
import warnings

import pytest
import torch

import normmatters as nm
from normmatters.bench import saved_bytes
from normmatters.kernels import compiled, lean_batch_norm


def _pair(norm, impl="compiled", device="cpu", **kw):
    """The layer on ``impl`` on ``device`` and its copy on the reference path on the CPU in float64."""
    lean = nm.LpBatchNorm2d(4, norm=norm, impl=impl, **kw)
    with torch.no_grad():
        lean.weight.uniform_(0.5, 1.5)
        lean.bias.normal_()
    ref = copy.deepcopy(lean).double()
    ref.impl = "reference"
    return lean.to(device), ref


def _on(m, x):
    """x moved to the device and dtype of module m's parameters."""
    return x.to(next(m.parameters()).device, next(m.parameters()).dtype)


def _assert_same_state(a, b):
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb
        torch.testing.assert_close(va.cpu().to(vb.dtype), vb, rtol=1e-5, atol=1e-6, msg=ka)


@pytest.mark.parametrize("impl", ["compiled", "native"])
@pytest.mark.parametrize("norm", ["l1", "range", "mean"])
@pytest.mark.parametrize("opts", [{}, {"momentum": None}, {"track_running_stats": False}])
def test_train_then_eval_matches_reference(norm, opts, impl, device):
    lean, ref = _pair(norm, impl=impl, device=device, **opts)
    for _ in range(3):
        x = torch.randn(8, 4, 6, 6) * 3 + 1
        torch.testing.assert_close(lean(_on(lean, x)).cpu().double(), ref(_on(ref, x)), rtol=1e-4, atol=1e-5)
    _assert_same_state(lean, ref)
    lean.eval()
    ref.eval()
    x = torch.randn(8, 4, 6, 6)
    torch.testing.assert_close(lean(_on(lean, x)).cpu().double(), ref(_on(ref, x)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["compiled", "native"])
@pytest.mark.parametrize("mode", ["raise", "skip", "ignore"])
def test_nonfinite_batches_never_touch_the_buffers(mode, impl, device):
    lean, ref = _pair("l1", impl=impl, device=device, nonfinite=mode)
    x0 = torch.randn(8, 4, 6, 6)
    lean(_on(lean, x0))
    ref(_on(ref, x0))
    x0[0, 1, 2, 3] = float("nan")
    for m in (lean, ref):
        x = _on(m, x0)
        before = copy.deepcopy(m.state_dict())
        if mode == "raise":
            with pytest.raises(nm.NonFiniteBatchError, match="LpBatchNorm2d"):
                m(x)
        else:  # skip (counted) and ignore: silent, on the device
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                m(x)
        _assert_same_state_dict(m.state_dict(), before)
        assert m.skipped_batches == (1 if mode != "ignore" else 0)


def _assert_same_state_dict(a, b):
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("norm", ["l2", "l1", "linf", "topk", "range", "mean"])
def test_saved_bytes_at_most_batchnorm(norm, device):
    x = torch.randn(8, 4, 6, 6, device=device, requires_grad=True)
    bn = saved_bytes(lambda: torch.nn.BatchNorm2d(4, device=device)(x))
    lean = saved_bytes(lambda: nm.LpBatchNorm2d(4, norm=norm, impl="eager", device=device)(x))
    naive = saved_bytes(lambda: nm.LpBatchNorm2d(4, norm=norm, impl="reference", device=device)(x))
    assert lean <= bn
    assert naive > bn or norm == "mean"  # the check tells the paths apart (mean-only is lean anyway)


def test_impl_switch_by_argument_and_environment(monkeypatch):
    x = torch.randn(8, 4, 6, 6, requires_grad=True)
    monkeypatch.setenv("NORMMATTERS_KERNEL", "reference")
    ref_bytes = saved_bytes(lambda: nm.LpBatchNorm2d(4)(x))
    monkeypatch.setenv("NORMMATTERS_KERNEL", "eager")
    assert saved_bytes(lambda: nm.LpBatchNorm2d(4)(x)) < ref_bytes
    assert saved_bytes(lambda: nm.LpBatchNorm2d(4, impl="reference")(x)) == ref_bytes
    monkeypatch.setenv("NORMMATTERS_KERNEL", "fast")
    with pytest.raises(ValueError, match=r"LpBatchNorm2d\(4, norm='l1'\).*NORMMATTERS_KERNEL.*'fast'"):
        nm.LpBatchNorm2d(4)(x)
    with pytest.raises(ValueError, match="LpBatchNorm2d: impl must be one of"):
        nm.LpBatchNorm2d(4, impl="cuda")


def test_compile_failure_falls_back_to_eager_with_one_warning(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(compiled, "_compiled", {})
    monkeypatch.setattr(torch, "compile", lambda fn, *a, **k: broken)  # what a machine without a compiler gets
    monkeypatch.setattr(compiled, "_failed", set())
    x = torch.randn(8, 4, 6, 6, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="torch.compile is unavailable on cpu") as rec:
        y = lean_batch_norm(x, None, None, training=True, impl="compiled")
        y.sum().backward()
        lean_batch_norm(x, None, None, training=True, impl="compiled")
    assert len([w for w in rec if "unavailable" in str(w.message)]) == 1
    ref = nm.lp_batch_norm(x, None, None, training=True)
    torch.testing.assert_close(y, ref)


@pytest.mark.parametrize("impl", ["eager", "compiled"])
def test_output_can_be_modified_in_place(impl, device):
    # models apply ReLU(inplace=True) right after the norm; the lean output must allow it, with the same grads
    # (impl on the test device; the reference on the CPU in float64)
    x = torch.randn(4, 3, 5, 5)
    grads = {}
    for which, dev, dtype in ((impl, device, torch.float32), ("reference", "cpu", torch.float64)):
        torch.manual_seed(0)
        net = torch.nn.Sequential(nm.LpBatchNorm2d(3, norm="l1", impl=which), torch.nn.ReLU(inplace=True))
        net.to(dev, dtype)
        xi = x.to(dev, dtype).clone().requires_grad_()
        net(xi).square().sum().backward()
        grads[which] = xi.grad.cpu().double()
    torch.testing.assert_close(grads[impl], grads["reference"], rtol=2e-4, atol=1e-5)


def test_compiled_copy_per_dtype_and_layout():
    # separate Dynamo caches: mixing dtypes and layouts must not exhaust one shared recompile budget
    x = torch.randn(4, 3, 5, 5)
    for t in (x, x.to(memory_format=torch.channels_last), x.double()):
        lean_batch_norm(t.requires_grad_(), None, None, training=True, norm="linf", impl="compiled")
    keys = {k for k in compiled._compiled if k[:2] == ("forward", "linf")}
    assert {("forward", "linf", "float32", "channels"), ("forward", "linf", "float32", "rows"),
            ("forward", "linf", "float64", "channels")} <= keys


@pytest.mark.parametrize("inplace", [False, True])
def test_many_channel_counts_stay_compiled(caplog, inplace):
    """Layers with many distinct channel counts (DenseNet has dozens), contiguous and channels_last, through
    the compiled kernels: weight and bias are nn.Parameters, whose shapes Dynamo would keep static — one
    recompile per channel count, past the limit (8) silently eager. They are passed to the kernels as plain
    tensors, so one dynamic kernel serves every count: no recompile-limit message."""
    caplog.set_level(logging.WARNING, logger="torch._dynamo")
    for cl in (False, True):
        for C in range(3, 14):
            layer = nm.LpBatchNorm2d(C, norm="l1", impl="compiled", inplace=inplace)
            base = torch.randn(4, C, 3, 3, requires_grad=True)
            x = base.to(memory_format=torch.channels_last) if cl else base * 1.0  # non-leaf: in place allowed
            layer(x).sum().backward()
    assert not [r for r in caplog.records if "recompile_limit" in r.getMessage()]
