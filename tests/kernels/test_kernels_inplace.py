"""``inplace=True`` (In-Place ABN style): the output overwrites the input, the backward reconstructs the
centered input from the output. Against the reference path (values, gradients, running statistics),
gradcheck, autograd's in-place checks, saved memory, the weight != 0 rule and torch.compile(fullgraph).
"""

from __future__ import annotations

import copy

import pytest
import torch

import normmatters as nm
from normmatters.bench import saved_bytes
from normmatters.functional import lp_batch_norm
from normmatters.kernels import lean_batch_norm

K = 3
# (norm, extra options): every estimator, and range with chunks
CASES = [("l2", {}), ("l1", {}), ("linf", {}), ("topk", {}), ("range", {}), ("range", {"chunks": 2}),
         ("mean", {})]
CASE_IDS = ["l2", "l1", "linf", "topk", "range", "range-chunks2", "mean"]
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}

F64 = {"rtol": 1e-10, "atol": 1e-10}
F32 = {"rtol": 2e-5, "atol": 1e-5}
# bfloat16: y, the weight and bias gradients and the running statistics agree to one bf16 rounding (as in
# test_kernels_lean). The input gradient is reconstructed from the bf16 output, i.e. from d known to 2^-8
# relative: l1's sign(d) flips for the few elements with |d| below that rounding (a bounded, localized
# change), so the input gradient is compared in relative L2 norm (2 %) plus a loose elementwise bound.
BF16 = {"rtol": 1.6e-2, "atol": 1.6e-2}
BF16_GX = {"rtol": 0.1, "atol": 0.1}


def _weight(C, dtype):
    # random signs, |w| in [0.5, 1.5]: the reconstruction divides by w (its accuracy goes as |b| / |w·r|)
    return torch.randn(C, dtype=dtype).sign() * (torch.rand(C, dtype=dtype) + 0.5)


def _run(x, w, b, g, norm, opts, *, inplace, impl="eager", device="cpu", dtype=None):
    """One training step from fresh leaves on ``device`` (inputs cast to ``dtype`` if given); the input passed
    to the layer is a non-leaf copy."""
    if dtype is not None:
        x, w, b, g = (t.to(dtype) for t in (x, w, b, g))
    x, w, b, g = (t.to(device) for t in (x, w, b, g))
    leaf = x.clone().requires_grad_()
    wl = w.clone().requires_grad_()
    bl = b.clone().requires_grad_()
    inp = leaf.clone()
    C = x.shape[1]
    sd = x.dtype if x.dtype == torch.float64 else torch.float32
    rm, rv = torch.zeros(C, dtype=sd, device=device), torch.ones(C, dtype=sd, device=device)
    nbt = torch.zeros((), dtype=torch.long, device=device)
    if inplace:
        y = lean_batch_norm(inp, rm, rv, wl, bl, True, 0.1, 1e-5, norm, k=K, num_batches_tracked=nbt,
                            impl=impl, inplace=True, **opts)
    else:
        y = lp_batch_norm(inp, rm, rv, wl, bl, True, 0.1, 1e-5, norm, k=K, num_batches_tracked=nbt, **opts)
    out = {"y": y.detach().clone(), "inp": inp, "y_obj": y}
    y.backward(g)
    out.update(gx=leaf.grad, gw=wl.grad, gb=bl.grad, rm=rm, rv=rv, nbt=nbt)
    return out


def _compare(x, norm, opts, impl, tol, gx_tol=None, memory_format=torch.contiguous_format, device="cpu"):
    """In place on ``impl`` on ``device`` against the reference path on the CPU in float64; returns both runs,
    every result on the CPU."""
    x = x.contiguous(memory_format=memory_format)
    wdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = _weight(x.shape[1], wdtype)
    b = torch.randn(x.shape[1], dtype=wdtype)
    g = torch.randn(x.shape, dtype=x.dtype).contiguous(memory_format=memory_format)
    ref = _run(x, w, b, g, norm, opts, inplace=False, dtype=torch.float64)
    out = _run(x, w, b, g, norm, opts, inplace=True, impl=impl, device=device)
    dtypes = {"y": x.dtype, "gx": x.dtype, "gw": wdtype, "gb": wdtype, "nbt": torch.long,
              "rm": x.dtype if x.dtype == torch.float64 else torch.float32}
    dtypes["rv"] = dtypes["rm"]
    # the output is the input: same tensor, same storage, its values overwritten, layout kept
    assert out["y_obj"] is out["inp"]
    assert out["y_obj"].data_ptr() == out["inp"].data_ptr()
    assert out["y_obj"].is_contiguous(memory_format=memory_format)
    assert not torch.equal(out["inp"].detach().cpu(), x)
    for key in ("y", "gx", "gw", "gb", "rm", "rv", "nbt"):
        assert out[key].dtype == dtypes[key] and out[key].device.type == torch.device(device).type, key
        out[key] = out[key].cpu()
        t = gx_tol if key == "gx" and gx_tol is not None else tol
        torch.testing.assert_close(out[key].to(ref[key].dtype), ref[key], **t,
                                   msg=lambda m, key=key: f"{norm} {key}: {m}")
    return out, ref


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("ghost", [None, 4])
@pytest.mark.parametrize("norm,opts", CASES, ids=CASE_IDS)
def test_eager_inplace_matches_reference_float64(norm, opts, ghost, layout, device):
    x = torch.randn(8, 3, 4, 5, dtype=torch.float64) * 3 + 1
    _compare(x, norm, dict(opts, ghost_batch_size=ghost), "eager", F64, memory_format=LAYOUTS[layout],
             device=device)


@pytest.mark.parametrize("norm,opts", CASES, ids=CASE_IDS)
def test_compiled_inplace_matches_reference_float32(norm, opts, device):
    # one shape per layout, then a ghost batch (a second group count: one dynamic recompile per norm)
    x = torch.randn(8, 4, 6, 6) * 2 + 0.5
    for layout in LAYOUTS.values():
        _compare(x, norm, opts, "compiled", F32, memory_format=layout, device=device)
    _compare(x, norm, dict(opts, ghost_batch_size=4), "compiled", F32, device=device)


@pytest.mark.parametrize("norm,opts", CASES, ids=CASE_IDS)
def test_eager_inplace_float32_and_other_strides(norm, opts, device):
    x = torch.randn(8, 4, 6, 6) * 2 + 0.5
    _compare(x, norm, opts, "eager", F32, device=device)
    # neither contiguous nor channels-last: normalized through a copy and written back into the input
    xt = torch.randn(8, 4, 6, 6).transpose(2, 3)
    assert not xt.is_contiguous() and not xt.is_contiguous(memory_format=torch.channels_last)
    w, b = _weight(4, torch.float32), torch.randn(4)
    inp = xt.clone()  # clone keeps the strides
    y = lean_batch_norm(inp, None, None, w, b, True, norm=norm, k=K, impl="eager", inplace=True, **opts)
    assert y is inp and y.stride() == xt.stride()
    torch.testing.assert_close(y, lp_batch_norm(xt, None, None, w, b, True, norm=norm, k=K, **opts), **F32)


@pytest.mark.parametrize("norm,opts", CASES, ids=CASE_IDS)
def test_compiled_inplace_bfloat16_within_tolerance(norm, opts, device):
    x = (torch.randn(8, 4, 6, 6) * 2 + 0.5).to(torch.bfloat16)
    out, ref = _compare(x, norm, opts, "compiled", BF16, gx_tol=BF16_GX, device=device)
    gx, rgx = out["gx"].double(), ref["gx"].double()
    assert (gx - rgx).norm() <= 0.02 * rgx.norm()


@pytest.mark.parametrize("norm,opts", CASES, ids=CASE_IDS)
def test_gradcheck_inplace_float64(norm, opts, device):
    x = (torch.randn(4, 2, 3, 3, dtype=torch.float64) * 2).to(device).requires_grad_()
    w = _weight(2, torch.float64).to(device).requires_grad_()
    b = torch.randn(2, dtype=torch.float64).to(device).requires_grad_()
    ghost = None if opts.get("chunks") else 2  # two ghost groups, or one group of two range chunks

    def f(x, w, b, memory_format=torch.contiguous_format):
        # a copy inside the function under test: the in-place Function overwrites its input
        xi = x.clone(memory_format=memory_format)
        y = lean_batch_norm(xi, None, None, w, b, True, 0.1, 1e-5, norm, k=K, ghost_batch_size=ghost,
                            impl="eager", inplace=True, **opts)
        assert y is xi and y.grad_fn.name() == "LeanBatchNormInplaceFunctionBackward"
        return y

    assert torch.autograd.gradcheck(f, (x, w, b), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(lambda *a: f(*a, memory_format=torch.channels_last), (x, w, b), eps=1e-6,
                                    atol=1e-6)


NATIVE_CASES = [(n, o) for n, o in CASES if not o]  # range chunks have no native kernel


def _native_inplace_fn(norm, layout):
    # the rows kernels (channels_last, (N, C)) have no in-place top-k: the compiled in-place kernels run it
    rows = layout != "contiguous"
    return "LeanBatchNormInplaceFunctionBackward" if rows and norm == "topk" else \
        "NativeBatchNormInplaceFunctionBackward"


@pytest.mark.cpu_only  # the native kernels are CPU operators
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "rows"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("norm,opts", NATIVE_CASES, ids=[n for n, _ in NATIVE_CASES])
def test_native_inplace_matches_reference(norm, opts, dtype, layout):
    """The native kernels in place: y written over the input, the backward rebuilding d and the thresholds
    from y in the kernel — channel kernels (contiguous) and rows kernels (channels_last, (N, C))."""
    if layout == "rows":
        x = torch.randn(40, 6, dtype=dtype) * 2 + 0.5
        out, _ = _compare(x, norm, opts, "native", F64 if dtype == torch.float64 else F32)
    else:
        x = torch.randn(8, 4, 6, 7, dtype=dtype) * 2 + 0.5
        out, _ = _compare(x, norm, opts, "native", F64 if dtype == torch.float64 else F32,
                          memory_format=LAYOUTS[layout])
    assert type(out["y_obj"].grad_fn).__name__ == _native_inplace_fn(norm, layout)


@pytest.mark.cpu_only  # the native kernels are CPU operators
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("norm,opts", NATIVE_CASES, ids=[n for n, _ in NATIVE_CASES])
def test_native_inplace_bfloat16_within_tolerance(norm, opts, layout):
    x = (torch.randn(8, 4, 6, 6) * 2 + 0.5).to(torch.bfloat16)
    out, ref = _compare(x, norm, opts, "native", BF16, gx_tol=BF16_GX, memory_format=LAYOUTS[layout])
    assert type(out["y_obj"].grad_fn).__name__ == _native_inplace_fn(norm, layout)
    gx, rgx = out["gx"].double(), ref["gx"].double()
    assert (gx - rgx).norm() <= 0.02 * rgx.norm()


@pytest.mark.cpu_only  # the native kernels are CPU operators
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("norm,opts", NATIVE_CASES, ids=[n for n, _ in NATIVE_CASES])
def test_gradcheck_native_inplace_float64(norm, opts, layout):
    x = (torch.randn(4, 2, 3, 3, dtype=torch.float64) * 2).requires_grad_()
    w = _weight(2, torch.float64).requires_grad_()
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        xi = x.clone(memory_format=LAYOUTS[layout])  # the in-place Function overwrites its input
        y = lean_batch_norm(xi, None, None, w, b, True, 0.1, 1e-5, norm, k=K, impl="native", inplace=True)
        assert y is xi and y.grad_fn.name() == _native_inplace_fn(norm, layout)
        return y

    assert torch.autograd.gradcheck(f, (x, w, b), eps=1e-6, atol=1e-6)


@pytest.mark.cpu_only  # the native kernels are CPU operators
def test_native_inplace_nonfinite_batch_raises_and_keeps_buffers():
    layer = nm.LpBatchNorm2d(3, norm="range", inplace=True, impl="native", nonfinite="raise")
    x = torch.randn(4, 3, 5, 5)
    x[1, 2, 0, 0] = float("nan")
    with pytest.raises(nm.NonFiniteBatchError):
        layer(x)
    assert torch.equal(layer.running_mean, torch.zeros(3)) and torch.equal(layer.running_var, torch.ones(3))
    assert layer.num_batches_tracked.item() == 0


@pytest.mark.parametrize("impl", ["eager", "reference", "native"])
def test_input_that_is_a_view(impl):
    # a batch slice (contiguous view) and a channel slice (strided view) of a tensor that requires grad
    for channels, index in ((4, (slice(2, 6),)), (6, (slice(None), slice(1, 5)))):
        grads = {}
        for which in ("inplace", "reference"):
            torch.manual_seed(0)
            leaf = torch.randn(8, channels, 5, 5, dtype=torch.float64, requires_grad=True)
            base = leaf * 1.0
            v = base[index]
            layer = nm.LpBatchNorm2d(4, norm="l1", impl=impl if which == "inplace" else "reference",
                                     inplace=which == "inplace").double()
            if which == "inplace":
                y = layer(v)
                assert y is v
                out = base
            else:
                out = base.clone()
                out[index] = layer(v)
            (out.square() * torch.arange(out.numel(), dtype=out.dtype).reshape(out.shape)).sum().backward()
            grads[which] = leaf.grad
        torch.testing.assert_close(grads["inplace"], grads["reference"], **F64)


def test_zero_weight_is_a_clear_error():
    layer = nm.LpBatchNorm2d(64, norm="l1", inplace=True)
    with torch.no_grad():
        layer.weight[[1, 5, 9]] = 0.0
    x = torch.randn(4, 64, 3, 3)
    before = x.clone()
    msg = (r"LpBatchNorm2d\(64, norm='l1'\): inplace=True needs every weight != 0 to reconstruct the input "
           r"from the output \(In-Place ABN\); found 3 zero entries — use inplace=False or re-initialise")
    with pytest.raises(ValueError, match=msg):
        layer(x)
    torch.testing.assert_close(x, before, rtol=0, atol=0)  # raised before touching the input
    with pytest.raises(ValueError, match="lean_batch_norm: .*found 1 zero entry"):
        lean_batch_norm(x, None, None, torch.tensor([0.0] + [1.0] * 63), None, True, inplace=True)
    # affine=False has w = 1; zero weights are fine without inplace and in eval mode
    nm.LpBatchNorm2d(64, affine=False, inplace=True)(x.clone())
    layer.inplace = False
    layer(x)
    layer.inplace = True
    layer.eval()
    layer(x)


def test_leaf_requiring_grad_is_refused_before_any_write():
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    before = x.detach().clone()
    m = nm.LpBatchNorm2d(3, inplace=True, impl="eager")
    with pytest.raises(RuntimeError, match="inplace=True cannot overwrite a leaf tensor that requires grad"):
        m(x)
    assert torch.equal(x.detach(), before) and int(m.num_batches_tracked) == 0


@pytest.mark.parametrize("impl", ["eager", "reference", "native"])
def test_input_saved_by_another_op_raises_at_backward(impl):
    # sigmoid's backward needs its output: overwriting it must be caught by autograd's version counter
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    y = nm.LpBatchNorm2d(3, inplace=True, impl=impl)(torch.sigmoid(x))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("impl", ["eager", "native"])
def test_relu_inplace_after_the_layer_raises_at_backward(impl):
    # the backward reconstructs from the output; ReLU(inplace=True) destroys it (In-Place ABN fuses the
    # activation for this reason): autograd reports it instead of returning wrong gradients
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), nm.LpBatchNorm2d(4, inplace=True, impl=impl),
                              torch.nn.ReLU(inplace=True))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        net(torch.randn(4, 3, 6, 6)).sum().backward()


@pytest.mark.parametrize("impl", ["eager", "compiled", "reference", "native"])
def test_conv_inplace_bn_relu_trains_like_reference(impl, device):
    # in place on the test device against the reference on the CPU in float64
    x = torch.randn(4, 3, 6, 6)
    grads = {}
    for which, dev, dtype in (("inplace", device, torch.float32), ("reference", "cpu", torch.float64)):
        torch.manual_seed(0)
        bn = nm.LpBatchNorm2d(4, norm="l1", impl=impl if which == "inplace" else "reference",
                              inplace=which == "inplace")
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), bn, torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1),
                                  torch.nn.ReLU(inplace=True)).to(dev, dtype)
        net(x.to(dev, dtype)).square().sum().backward()
        grads[which] = [t.cpu().double() for t in [p.grad for p in net.parameters()] + [bn.running_mean,
                                                                                          bn.running_var]]
    for a, b in zip(grads["inplace"], grads["reference"], strict=True):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=1e-5)


@pytest.mark.parametrize("impl", ["eager", "native"])
@pytest.mark.parametrize("norm", ["l2", "l1", "linf", "topk", "range", "mean"])
def test_saved_bytes(norm, impl):
    x0 = torch.randn(16, 8, 12, 12, requires_grad=True)
    out_bytes = x0.numel() * x0.element_size()
    seen = []

    def layer_saved(inplace):
        layer = nm.LpBatchNorm2d(8, norm=norm, impl=impl, inplace=inplace)
        return saved_bytes(lambda: seen.append(layer(x0.clone())))

    bn = saved_bytes(lambda: torch.nn.BatchNorm2d(8)(x0.clone()))
    assert layer_saved(False) <= bn
    # in place: the output (the input's storage, counted once) plus at most 5 % of the input
    assert layer_saved(True) <= out_bytes + 0.05 * out_bytes
    # and what is saved beyond the output is only (C,)-vectors: w, b and raw
    assert layer_saved(True) - out_bytes <= 3 * 8 * 4


@pytest.mark.parametrize("impl", ["eager", "native"])
def test_saved_tensor_is_the_output_storage(impl):
    x = torch.randn(8, 4, 5, 5, requires_grad=True).clone()
    ptrs = []

    def pack(t):
        ptrs.append((t.untyped_storage().data_ptr(), t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = nm.LpBatchNorm2d(4, norm="linf", impl=impl, inplace=True)(x)
    big = [p for p, numel in ptrs if numel == x.numel()]
    assert big == [y.untyped_storage().data_ptr()] == [x.untyped_storage().data_ptr()]


@pytest.mark.parametrize("norm", ["l1", "mean"])
def test_eval_mode_in_place_unless_the_input_requires_grad(norm):
    layer = nm.LpBatchNorm2d(4, norm=norm, inplace=True, impl="eager")
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
    for _ in range(2):
        layer(torch.randn(8, 4, 5, 5) * 2 + 1)
    layer.eval()
    ref = copy.deepcopy(layer)
    ref.inplace = False
    ref.impl = "reference"
    for memory_format in LAYOUTS.values():
        x = torch.randn(8, 4, 5, 5).contiguous(memory_format=memory_format)
        expected = ref(x)
        inp = x.clone(memory_format=memory_format)
        y = layer(inp)
        assert y is inp and y.is_contiguous(memory_format=memory_format)
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
        # with grad enabled and a trainable weight, the weight still gets its gradient
        y.sum().backward()
        expected.sum().backward()
        torch.testing.assert_close(layer.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-5)
        layer.zero_grad()
        ref.zero_grad()
    # an input that requires grad: out of place, input untouched, gradient as the reference
    leaf = torch.randn(8, 4, 5, 5, requires_grad=True)
    inp = leaf.clone()
    before = inp.detach().clone()
    y = layer(inp)
    assert y is not inp and y.data_ptr() != inp.data_ptr()
    torch.testing.assert_close(inp.detach(), before, rtol=0, atol=0)
    torch.testing.assert_close(y, ref(before), rtol=1e-5, atol=1e-6)
    with torch.inference_mode():  # the typical use: inference without autograd
        z = torch.randn(8, 4, 5, 5)
        assert layer(z) is z


def test_reference_impl_inplace_copies_into_the_input():
    x = torch.randn(8, 4, 5, 5, dtype=torch.float64)
    w, b = _weight(4, torch.float64), torch.randn(4, dtype=torch.float64)
    g = torch.randn_like(x)
    ref = _run(x, w, b, g, "range", {}, inplace=False)
    out = _run(x, w, b, g, "range", {}, inplace=True, impl="reference")
    assert out["y_obj"] is out["inp"]
    for key in ("y", "gx", "gw", "gb", "rm", "rv"):
        torch.testing.assert_close(out[key], ref[key], **F64)


def test_module_option():
    layer = nm.LpBatchNorm2d(4, inplace=True)
    assert layer.inplace and "inplace=True" in repr(layer)
    assert "inplace" not in repr(nm.LpBatchNorm2d(4))
    alias = nm.RangeBatchNorm1d(4, inplace=True)
    assert alias.inplace and alias.norm == "range"
    with pytest.raises(ValueError, match=r"LpBatchNorm2d: inplace=True is not supported with precision="):
        nm.LpBatchNorm2d(4, inplace=True, precision="bf16")
    with pytest.raises(ValueError, match="inplace must be a bool"):
        nm.LpBatchNorm2d(4, inplace="yes")
    # a module pickled before the option existed has no instance attribute: the class default applies
    old = nm.LpBatchNorm2d(4)
    del old.__dict__["inplace"]
    assert old.inplace is False
    old(torch.randn(4, 4, 3, 3))


def test_compile_fullgraph_trains_without_graph_break(device):
    """Compiled and eager in place on the test device, the reference on the CPU in float64."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()

    def make(inplace, impl):
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1),
                                   nm.LpBatchNorm2d(4, norm="l1", inplace=inplace, impl=impl), torch.nn.ReLU(),
                                   torch.nn.Conv2d(4, 4, 3, padding=1),
                                   nm.LpBatchNorm2d(4, norm="range", inplace=inplace, impl=impl),
                                   torch.nn.ReLU())

    model, eager, ref = make(True, None).to(device), make(True, "eager").to(device), make(False, "reference")
    ref.double()
    cmodel = torch.compile(model, fullgraph=True)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, eager, ref)]
    for _ in range(3):
        x = torch.randn(8, 3, 6, 6)
        outs = []
        for m, opt in zip((cmodel, eager, ref), opts, strict=True):
            opt.zero_grad()
            y = m(x.to(next(m.parameters()).device, next(m.parameters()).dtype))
            y.square().mean().backward()
            opt.step()
            outs.append(y.detach().cpu().double())
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(outs[0], outs[2], rtol=1e-4, atol=1e-5)
    assert not counters["graph_break"]
    for m in (eager, ref):
        for (k, a), (_, b) in zip(model.state_dict().items(), m.state_dict().items(), strict=True):
            torch.testing.assert_close(a.cpu().to(b.dtype), b.cpu(), rtol=1e-4, atol=1e-5, msg=k)
