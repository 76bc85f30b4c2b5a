"""Which row-norm kernel runs (impl, $NORMMATTERS_KERNEL), the compiled path against the reference, edge rows
(constant, huge values), torch.compile(fullgraph=True) / torch.export with the native operators, and the bytes
saved for backward against the stock layers."""

import pytest
import torch
from row_cases import KINDS, NORMS, call, make, outputs_and_grads
from torch import nn

import normmatters as nm
from normmatters.bench import saved_bytes
from normmatters.kernels import row_native, row_norm
from normmatters.kernels import triton as triton_kernels


def test_decide_maps_impl_to_a_path(monkeypatch):
    decide = row_norm.decide
    assert decide("reference", "cpu", torch.float32, "l1", 10) == "reference"
    assert decide("eager", "cpu", torch.float32, "l1", 10) == "eager"
    assert decide("compiled", "cpu", torch.float32, "l1", 10) == "compiled"
    # on CUDA: the Triton kernels where triton is importable, else Inductor
    assert decide("auto", "cuda", torch.float32, "l1", 10) == ("triton" if triton_kernels.available() else "compiled")
    assert decide("triton", "cpu", torch.float32, "l1", 10) == "triton"
    assert decide("triton", "cpu", torch.float32, "topk", 17) == "eager"  # past the Triton top-k: the formulas
    assert decide("auto", "cpu", torch.float32, "topk", 65) == "compiled"  # past the native top-k
    monkeypatch.setenv("NORMMATTERS_KERNEL", "reference")
    calls = []
    monkeypatch.setattr(row_norm.row_formulas, "reference", lambda *a: calls.append(a) or a[0].clone())
    nm.lp_layer_norm(torch.randn(3, 8), 8)
    assert len(calls) == 1


def test_bad_impl_names_the_function():
    with pytest.raises(ValueError, match="lp_layer_norm: impl must be one of"):
        nm.lp_layer_norm(torch.randn(2, 4), 4, impl="fast")


def test_auto_takes_native_on_cpu(monkeypatch):
    if not (row_native.ensure() and row_native.native()):
        pytest.skip("no C++ compiler")
    calls = []
    monkeypatch.setattr(row_norm, "_ROW_OP", lambda *a: calls.append(a[4]) or a[0].clone())
    x = torch.randn(4, 16)
    nm.lp_layer_norm(x, 16, norm="l1")
    nm.lp_layer_norm(x, 16, norm="topk", k=65 - 49)
    assert calls == ["l1", "topk"]
    nm.lp_layer_norm(torch.randn(4, 80), 80, norm="topk", k=65)  # past the native top-k: the compiled path
    nm.lp_layer_norm(x, 16, norm="l1", impl="eager")
    assert calls == ["l1", "topk"]


@pytest.mark.parametrize("kind,norm", [("layer", "l1"), ("rms", "topk"), ("group", "range")])
def test_compiled_matches_reference(kind, norm):
    x, params = make(kind, (4, 6, 5) if kind == "group" else (7, 24), torch.float32)
    ref = outputs_and_grads(kind, x, params, norm, "reference")
    for a, b in zip(outputs_and_grads(kind, x, params, norm, "compiled"), ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["native", "eager"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("norm", NORMS)
def test_constant_rows_have_finite_gradients(impl, kind, norm):
    x = torch.full((3, 4, 6) if kind == "group" else (3, 12), 2.5, dtype=torch.float64)
    _, params = make(kind, x.shape)
    ref = outputs_and_grads(kind, x, params, norm, "reference")
    got = outputs_and_grads(kind, x, params, norm, impl)
    # RMS top-k of a constant row: every |x| ties at the threshold; the fast paths share the gradient evenly among
    # the tied elements, autograd's topk gives it to k of them (both are subgradients): compare y only
    compared = got[:1] if (kind, norm) == ("rms", "topk") else got
    for a in got:
        assert torch.isfinite(a).all()
    for a, b in zip(compared, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_constant_rows_compiled():
    x = torch.full((3, 12), 2.5)
    _, params = make("layer", x.shape, torch.float32)
    for a, b in zip(outputs_and_grads("layer", x, params, "linf", "compiled"),
                    outputs_and_grads("layer", x, params, "linf", "reference")):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["native", "eager"])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_huge_float32_values(impl, norm, kind):
    x, params = make(kind, (4, 33), torch.float32)
    x = x * 1e20  # squares overflow float32
    y = call(kind, x, params, norm, impl)
    expected = call(kind, x.double(), tuple(p.double() for p in params), norm, "reference")
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), expected, rtol=1e-4, atol=1e-4)


def _export_ops(module, x):
    import re

    ep = torch.export.export(module, (x,))
    return set(re.findall(r"normmatters\.(\w+)", str(ep.graph_module.code)))


@pytest.mark.parametrize("layer", [lambda: nm.LpLayerNorm(16, norm="l1"), lambda: nm.LpRMSNorm(16, norm="topk", k=3),
                                   lambda: nm.LpGroupNorm(2, 4, norm="range", chunks=2)])
def test_compile_fullgraph_and_export_use_the_native_operators(layer):
    if not row_native.ensure():
        pytest.skip("no C++ compiler")
    m = layer().double()
    x = torch.randn(3, 4, 4, 4, dtype=torch.float64) if isinstance(m, nm.LpGroupNorm) else \
        torch.randn(3, 5, 16, dtype=torch.float64)
    assert _export_ops(m, x) & {"lp_row_norm", "lp_row_norm_fwd"}
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = m(xa), compiled(xb)
    ya.sum().backward()
    yb.sum().backward()
    torch.testing.assert_close(yb, ya)
    torch.testing.assert_close(xb.grad, xa.grad)


@pytest.mark.parametrize("impl", ["native", "eager"])
@pytest.mark.parametrize("norm", NORMS)
def test_saved_bytes_at_most_the_stock_layer(impl, norm):
    x = torch.randn(64, 256, requires_grad=True)
    opts = {"k": 3} if norm == "topk" else {}
    pairs = [(nn.LayerNorm(256), nm.LpLayerNorm(256, norm=norm, impl=impl, **opts), x),
             (nn.RMSNorm(256), nm.LpRMSNorm(256, norm=norm, impl=impl, **opts), x),
             (nn.GroupNorm(4, 16), nm.LpGroupNorm(4, 16, norm=norm, impl=impl, **opts),
              torch.randn(64, 16, 4, 4, requires_grad=True))]
    for stock, ours, inp in pairs:
        limit = saved_bytes(lambda s=stock, i=inp: s(i))
        if norm == "topk":  # one more float32 per row: the k-th largest |d| that backward compares against
            limit += 4 * (inp.numel() // inp.shape[-1] if not isinstance(ours, nm.LpGroupNorm) else 64 * 4)
        assert saved_bytes(lambda o=ours, i=inp: o(i)) <= limit, type(ours).__name__


def test_a_failed_compile_disables_only_that_input(monkeypatch):
    seen = []

    def fake_compiled(x2, *args):
        seen.append(tuple(x2.shape))
        if x2.shape[0] == 3:
            raise RuntimeError("no compiler for this one")
        return row_norm.row_formulas.forward(x2, *args)

    key = ("forward", "l1", "centered", "float32")
    monkeypatch.setitem(row_norm._compiled, key, fake_compiled)
    monkeypatch.setattr(row_norm, "_failed", set())
    ref = nm.lp_layer_norm(torch.randn(3, 8), 8, impl="reference")  # noqa: F841 - warm-up of nothing compiled
    with pytest.warns(RuntimeWarning, match=r"rows of shape \[3, 8\]"):
        nm.lp_layer_norm(torch.randn(3, 8), 8, impl="compiled")
    x = torch.randn(5, 8)
    torch.testing.assert_close(nm.lp_layer_norm(x, 8, impl="compiled"), nm.lp_layer_norm(x, 8, impl="reference"))
    nm.lp_layer_norm(torch.randn(3, 8), 8, impl="compiled")  # the failed input: eager, no second try
    assert seen == [(3, 8), (5, 8)]
