"""The native CPU kernels (normmatters.kernels.native) against the reference path: values, gradients, running
statistics, ties, gradcheck and the eligibility rules with their fallback (the build and the compiler-missing
fallback: test_native_build.py)."""

import pytest
import torch

import normmatters as nm
from normmatters.kernels import compiled, dispatch, native
from normmatters.kernels.lean import lean_batch_norm

# the native C++/OpenMP kernels are CPU operators: CPU whatever the test device
pytestmark = pytest.mark.cpu_only

NORMS = ("mean", "l2", "l1", "linf", "range", "topk")
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5)}


@pytest.fixture(autouse=True)
def _need_native():
    if not native.available():
        pytest.skip("native kernels unavailable (no C compiler)")


def _run(x0, norm, impl, w0, b0, g, **kw):
    x = x0.clone().requires_grad_()
    w = w0.clone().requires_grad_()
    b = b0.clone().requires_grad_()
    C = x0.shape[1]
    rm = torch.zeros(C, dtype=x0.dtype)
    rv = None if norm == "mean" else torch.ones(C, dtype=x0.dtype)
    if impl == "reference":
        y = nm.lp_batch_norm(x, rm, rv, w, b, training=True, norm=norm, **kw)
    else:
        y = lean_batch_norm(x, rm, rv, w, b, training=True, norm=norm, impl=impl, **kw)
    y.backward(g)
    return y, (y.detach(), x.grad, w.grad, b.grad, rm, rv), type(y.grad_fn).__name__


def _compare(x0, norm, impl="native", expect="NativeBatchNormFunctionBackward", against="reference", **kw):
    C = x0.shape[1]
    w0 = torch.rand(C, dtype=x0.dtype) + 0.5
    b0 = torch.randn(C, dtype=x0.dtype)
    g = torch.randn_like(x0)
    _, got, fn = _run(x0, norm, impl, w0, b0, g, **kw)
    _, ref, _ = _run(x0, norm, against, w0, b0, g, **kw)
    assert fn == expect
    tol = TOL.get(x0.dtype, dict(rtol=2e-2, atol=2e-2))
    for name, a, r in zip(("y", "grad x", "grad w", "grad b", "running_mean", "running_var"), got, ref):
        if r is not None:
            torch.testing.assert_close(a, r, **tol, msg=lambda m, name=name: f"{norm} {name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("shape", [(8, 3, 5, 6), (16, 4), (6, 3, 7), (4, 3, 150)])
def test_native_matches_reference(norm, dtype, shape):
    _compare(torch.randn(shape, dtype=dtype) * 2 + 1, norm)  # (16, 4) is the rows layout


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("layout", ["channels_last", "channels_last_3d", "rows", "spatial_1", "many_rows"])
def test_native_rows_kernels_match_reference(norm, dtype, layout):
    """Channels-innermost inputs go to the rows kernels: channels_last 4-d / 5-d, (N, C), (N, C, 1), and more
    rows than one block per thread (several partial sums to combine)."""
    x = torch.randn({"channels_last": (6, 5, 4, 3), "channels_last_3d": (4, 3, 2, 3, 5), "rows": (20, 7),
                     "spatial_1": (9, 6, 1), "many_rows": (1000, 9)}[layout], dtype=dtype) * 2 + 1
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "channels_last_3d":
        x = x.to(memory_format=torch.channels_last_3d)
    assert native.channels_innermost(x) and native.eligible(x, torch.ones(x.shape[1], dtype=dtype),
                                                            torch.zeros(x.shape[1], dtype=dtype), norm, 1, 1)
    # top-k: per-thread candidates merged per channel; k = 7 fits the 9 samples of spatial_1
    _compare(x, norm, **({"k": 7} if norm == "topk" else {}))


@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("shape", [(8, 3, 5, 6), (6, 3, 37), "channels_last"])
def test_native_bfloat16_matches_reference(norm, shape, param_dtype, monkeypatch):
    """bfloat16 elements computed in float32 (statistics and buffers too): output and gradients within
    bfloat16 rounding of the reference (2e-2), also through the streamed-store path."""
    cl = shape == "channels_last"
    shape = (6, 5, 4, 3) if cl else shape
    x0 = (torch.randn(shape) * 2 + 1).bfloat16()
    if cl:
        x0 = x0.to(memory_format=torch.channels_last)
    C = shape[1]
    w0 = (torch.rand(C) + 0.5).to(param_dtype)
    b0 = torch.randn(C).to(param_dtype)
    g = torch.randn(shape).bfloat16()
    for stream in (1 << 40, 0):
        monkeypatch.setattr(native, "STREAM_BYTES", stream)
        _, got, fn = _run(x0, norm, "native", w0, b0, g)
        _, ref, _ = _run(x0, norm, "reference", w0, b0, g)
        assert fn == "NativeBatchNormFunctionBackward"
        for name, a, r in zip(("y", "grad x", "grad w", "grad b", "running_mean", "running_var"), got, ref):
            if r is not None:
                assert a.dtype == r.dtype, name
                torch.testing.assert_close(a.float(), r.float(), rtol=2e-2, atol=2e-2, msg=name)


def test_bfloat16_rounding_is_to_nearest_even_and_keeps_nan():
    """The C float -> bfloat16 store rounds exactly as torch does (nearest, ties to even) and keeps NaN.
    Channel 0 has mean exactly 0, so y = x·w is an exact float32 product that the store must round; with
    w = 1 + 2^-8, x = ±1 is an exact tie (to even: 1.0). Channel 1 holds a NaN: all of it is NaN."""
    v = [1.0, 1.0078125, 2.5, 3.0, 1.5, 7.0, 0.75, 1.0234375]
    x = torch.tensor([v + [-t for t in v], [1.0] * 15 + [float("nan")]]).bfloat16().unsqueeze(0)
    w = torch.tensor([1 + 2**-8, 1.0])
    y = lean_batch_norm(x, None, None, w, torch.zeros(2), training=True, norm="mean", impl="native",
                        nonfinite="ignore")
    assert y.dtype == torch.bfloat16
    assert torch.equal(y[0, 0], (x[0, 0].float() * w[0]).bfloat16())
    assert y[0, 0, 0].item() == 1.0  # the tie went to the even neighbour
    assert y[0, 1].isnan().all()


@pytest.mark.parametrize("norm", NORMS)
def test_native_matches_reference_streamed_output(norm, monkeypatch):
    monkeypatch.setattr(native, "STREAM_BYTES", 0)  # non-temporal stores, with unaligned rows (S = 37)
    _compare(torch.randn(5, 3, 37, dtype=torch.float32), norm)
    _compare(torch.randn(5, 3, 37, dtype=torch.float64), norm)
    # the rows kernels: odd C, and C over one 1024-element output block
    _compare(torch.randn(6, 7, 3, 5, dtype=torch.float32).to(memory_format=torch.channels_last), norm)
    _compare(torch.randn(12, 1100, dtype=torch.float32), norm)


@pytest.mark.parametrize("norm", ["linf", "range", "topk"])
def test_ties_share_the_gradient_like_the_reference(norm):
    x = torch.randn(6, 2, 4, 4, dtype=torch.float64)
    for n, h, w in ((0, 1, 1), (2, 3, 0), (5, 2, 2)):
        x[n, 0, h, w] = 5.0  # three-way tie at the max of channel 0
    for n, h, w in ((1, 0, 0), (4, 3, 3)):
        x[n, 0, h, w] = -2.0 if norm == "range" else -7.0  # range: tied min; linf: tied largest |d|
    for n, h, w in ((0, 0, 0), (3, 1, 2)):
        x[n, 1, h, w] = 4.0
    for n, h, w in ((1, 1, 1), (2, 2, 2), (5, 0, 3)):
        x[n, 1, h, w] = -4.0
    # top-4 of channel 0: the two |d| ≈ 7 and two of the three ≈ 5. Autograd through torch.topk gives the
    # two slots to two of the tied elements; the lean kernels share them among all three (the average over
    # tie-breaks, as amax does for linf), so top-k ties are checked against the eager lean formulas
    kw = {"k": 4, "against": "eager"} if norm == "topk" else {}
    _compare(x, norm, **kw)
    _compare(x.float(), norm, **kw)
    _compare(x.to(memory_format=torch.channels_last), norm, **kw)  # the rows kernels


@pytest.mark.parametrize(("norm", "layout"), [(n, "contiguous") for n in NORMS]
                         + [(n, "channels_last") for n in NORMS])
def test_gradcheck_native(norm, layout):
    torch.manual_seed(1)
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    if layout == "channels_last":  # the rows kernels
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    layer = nm.LpBatchNorm2d(2, norm=norm, impl="native", dtype=torch.float64).train()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
    assert type(layer(x).grad_fn).__name__ == "NativeBatchNormFunctionBackward"
    assert torch.autograd.gradcheck(lambda t, w, b: lean_batch_norm(t, None, None, w, b, training=True,
                                                                    norm=norm, impl="native"),
                                    (x, layer.weight, layer.bias), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("k", [1, 7, 64])
def test_native_topk_matches_reference_for_every_k(k):
    """The top-k kept per channel (skipping 64-element blocks that cannot enter it) for k up to TOPK_MAX."""
    _compare(torch.randn(5, 2, 9, 31, dtype=torch.float64), "topk", k=k)


def test_ineligible_cases_are_recognised():
    x = torch.randn(4, 3, 5, 5)
    w, b = torch.ones(3), torch.zeros(3)
    assert native.eligible(x, w, b, "l1", 1, 1)
    assert native.eligible(x.to(memory_format=torch.channels_last), w, b, "l1", 1, 1)
    assert not native.eligible(x.transpose(2, 3), w, b, "l1", 1, 1)
    assert not native.eligible(x, w, b, "l1", 2, 1)  # ghost batches
    assert not native.eligible(x, w, b, "range", 1, 2)  # range chunks
    assert native.eligible(x, w, b, "topk", 1, 1)
    assert not native.eligible(x, w, b, "topk", 1, 1, k=native.TOPK_MAX + 1)
    assert native.eligible(x.to(memory_format=torch.channels_last), w, b, "topk", 1, 1)  # the rows kernels
    assert native.eligible(x.bfloat16(), w.bfloat16(), b.bfloat16(), "l1", 1, 1)
    assert native.eligible(x.bfloat16(), w, b, "l1", 1, 1)  # float32 parameters with bfloat16 elements
    assert not native.eligible(x.bfloat16(), w.bfloat16(), b, "l1", 1, 1)  # weight and bias must agree
    assert not native.eligible(x.half(), w.half(), b.half(), "l1", 1, 1)
    assert not native.eligible(x, w.double(), b.double(), "l1", 1, 1)  # mixed parameter dtype
    # "auto" prefers native for channels-innermost input and long enough rows (AUTO_MIN_ROW_BYTES, bfloat16:
    # AUTO_MIN_ROW_BYTES_BF16)
    assert dispatch._use_native("auto", torch.randn(4, 3, 16, 16), w, b, "l1", 1, 1)  # 1 KB rows
    assert dispatch._use_native("auto", torch.randn(4, 3, 7, 7), w, b, "l1", 1, 1)  # 196 B rows
    assert dispatch._use_native("auto", torch.randn(8192, 3, 8, 8), w, b, "l1", 1, 1)  # 256 B rows, 6 MB
    assert dispatch._use_native("auto", torch.randn(4, 3, 4, 4), w, b, "l1", 1, 1)  # 64 B rows
    assert not dispatch._use_native("auto", torch.randn(8192, 3, 3, 3), w, b, "l1", 1, 1)  # 36 B rows, 864 KB
    assert not dispatch._use_native("auto", torch.randn(2048, 3, 7, 7).bfloat16(), w, b, "l1", 1, 1)  # 98 B rows
    assert dispatch._use_native("auto", torch.randn(4, 3, 8, 8).bfloat16(), w, b, "l1", 1, 1)  # 128 B rows
    assert dispatch._use_native("auto", torch.randn(8192, 3, 3, 3), w, b, "topk", 1, 1)  # top-k: always native
    assert dispatch._use_native("auto", torch.randn(16, 3), w, b, "l1", 1, 1)
    assert dispatch._use_native("auto", x.to(memory_format=torch.channels_last), w, b, "l1", 1, 1)
    assert not dispatch._use_native("auto", torch.randn(16384, 3, 4), w, b, "l1", 1, 1)  # 16 B rows, 768 KB
    assert dispatch._use_native("native", torch.randn(16384, 3, 4), w, b, "l1", 1, 1)
    assert not dispatch._use_native("compiled", x, w, b, "l1", 1, 1)


@pytest.fixture
def _eager_fallback(monkeypatch):
    """The fallback of "native" is the compiled path; run its formulas eagerly (as after an Inductor failure)
    so these tests check the routing without seconds of compilation per case."""
    monkeypatch.setattr(compiled, "_failed", {"cpu"})


@pytest.mark.parametrize("case", ["strided", "ghost", "topk", "float16"])
def test_ineligible_cases_fall_back_and_match(case, _eager_fallback):
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64)
    if case == "strided":  # neither contiguous nor channels-innermost
        _compare(x.transpose(2, 3), "l1", expect="LeanBatchNormFunctionBackward")
    elif case == "ghost":
        _compare(x, "l1", expect="LeanBatchNormFunctionBackward", ghost_batch_size=4)
    elif case == "topk":
        _compare(x, "topk", expect="LeanBatchNormFunctionBackward", k=native.TOPK_MAX + 1)
    else:
        _compare(x.half(), "l1", expect="LeanBatchNormFunctionBackward")


def test_double_backward_raises_instead_of_silently_wrong():
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    y = lean_batch_norm(x, None, None, training=True, norm="l1", impl="native")
    (gx,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad|double backward"):
        gx.sum().backward()


@pytest.mark.parametrize("norm", NORMS)
def test_buffers_the_kernel_cannot_update_are_updated_from_its_statistics(norm):
    """float64 running buffers with float32 input are not updated inside the kernel (not
    ``update_fusable``): the statistics it returns feed the separate update, with the reference's result."""
    x = torch.randn(8, 3, 5, 5) * 2 + 1
    bufs = {}
    for impl in ("native", "reference"):
        rm = torch.zeros(3, dtype=torch.float64)
        rv = None if norm == "mean" else torch.ones(3, dtype=torch.float64)
        nbt = torch.tensor(0)
        assert not native.update_fusable(x, rm, rv, nbt)
        fn = lean_batch_norm if impl == "native" else nm.lp_batch_norm
        kw = {"impl": "native"} if impl == "native" else {}
        fn(x, rm, rv, training=True, norm=norm, num_batches_tracked=nbt, **kw)
        bufs[impl] = (rm, rv, nbt)
    for a, r in zip(bufs["native"], bufs["reference"]):
        if r is not None:
            torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("norm", ["l1", "range"])
def test_fused_update_is_masked_and_reported_like_the_reference(norm):
    """The in-kernel update: an inf in the batch leaves buffers and the counter as they were and raises (also
    with no buffers at all, as the reference does); a finite batch moves them as the reference does."""
    C = 3
    x = torch.randn(6, C, 4, 4)
    rm, rv, nbt = torch.zeros(C), torch.ones(C), torch.tensor(2)
    assert native.update_fusable(x, rm, rv, nbt)
    bad = x.clone()
    bad[1, 2, 0, 0] = float("inf")
    with pytest.raises(nm.NonFiniteBatchError):
        lean_batch_norm(bad, rm, rv, training=True, norm=norm, num_batches_tracked=nbt, impl="native",
                        nonfinite="raise")
    assert torch.equal(rm, torch.zeros(C)) and torch.equal(rv, torch.ones(C)) and nbt.item() == 2
    with pytest.raises(nm.NonFiniteBatchError):
        lean_batch_norm(bad, None, None, training=True, norm=norm, impl="native", nonfinite="raise")
    ref = (torch.zeros(C), torch.ones(C), torch.tensor(2))
    for mom in (0.3, torch.tensor(0.25)):
        lean_batch_norm(x, rm, rv, training=True, norm=norm, num_batches_tracked=nbt, momentum=mom,
                        impl="native")
        nm.lp_batch_norm(x, *ref[:2], training=True, norm=norm, num_batches_tracked=ref[2], momentum=mom)
    for a, r in zip((rm, rv, nbt), ref):
        torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("norm", NORMS)
def test_rows_kernels_report_nonfinite_batches(norm, value):
    """A NaN or inf in channels_last input (the rows kernels; top-k keeps NaN candidates as the channel
    kernels do) raises and leaves the buffers untouched."""
    C = 3
    bad = torch.randn(6, C, 4, 4).to(memory_format=torch.channels_last)
    bad[1, 2, 0, 0] = value
    rm, rv, nbt = torch.zeros(C), torch.ones(C), torch.tensor(2)
    with pytest.raises(nm.NonFiniteBatchError):
        lean_batch_norm(bad, rm, rv, training=True, norm=norm, num_batches_tracked=nbt, impl="native",
                        nonfinite="raise")
    assert torch.equal(rm, torch.zeros(C)) and torch.equal(rv, torch.ones(C)) and nbt.item() == 2



@pytest.mark.parametrize("buf_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("norm", ["mean", "l1", "range"])
def test_bfloat16_running_buffers_updated_in_kernel_like_the_reference(norm, buf_dtype):
    """bfloat16 input with bfloat16 buffers (a model.bfloat16()) or float32 buffers: the in-kernel update
    rounds like the reference's bfloat16 tensor ops (within one bfloat16 ulp over several batches)."""
    C = 4
    bufs = {}
    for impl in ("native", "reference"):
        rm = torch.zeros(C, dtype=buf_dtype)
        rv = None if norm == "mean" else torch.ones(C, dtype=buf_dtype)
        nbt = torch.tensor(0)
        gen = torch.Generator().manual_seed(1)
        for step in range(3):
            x = (torch.randn(8, C, 5, 5, generator=gen) * (step + 1) + step).bfloat16()
            if impl == "native":
                assert native.update_fusable(x, rm, rv, nbt)
                lean_batch_norm(x, rm, rv, torch.ones(C), torch.zeros(C), training=True, norm=norm,
                                momentum=0.3, num_batches_tracked=nbt, impl="native")
            else:
                nm.lp_batch_norm(x, rm, rv, torch.ones(C), torch.zeros(C), training=True, norm=norm,
                                 momentum=0.3, num_batches_tracked=nbt)
        bufs[impl] = (rm, rv, nbt)
    for a, r in zip(bufs["native"], bufs["reference"]):
        if r is not None:
            assert a.dtype == r.dtype
            torch.testing.assert_close(a.float(), r.float(), rtol=8e-3, atol=1e-6)


@pytest.mark.parametrize("block_bytes", [1, 1 << 30])
@pytest.mark.parametrize("norm", NORMS)
def test_channel_blocks_match_reference(norm, block_bytes, monkeypatch):
    """One channel per task, and blocks of several channels with a ragged last block (C = 5: 3 + 2)."""
    monkeypatch.setattr(native, "BLOCK_BYTES", block_bytes)
    x = torch.randn(6, 5, 7, 9, dtype=torch.float64) * 2 + 1
    assert native._channel_block_for(*native._dims(x), x.dtype, 2) == (1 if block_bytes == 1 else 3)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    _compare(x, norm)
    _compare(x.float(), norm)


def test_range_positions_mark_unique_and_tied_extremes():
    """pos[0, c] / pos[1, c]: sample·S + spatial index of channel c's max / min, or -(first + 1) when tied;
    backward skips the comparisons for channels whose max and min are both unique and patches those two."""
    x = torch.randn(3, 4, 2, 3, dtype=torch.float64)
    S = 6
    x[0, 1, 0, 1] = x[2, 1, 1, 0] = 9.0  # channel 1: tied max (first at 0·S + 1)
    x[1, 2, 0, 0] = x[1, 2, 1, 2] = -9.0  # channel 2: tied min (first at 1·S + 0)
    x[2, 3, 1, 2] = 9.0  # channel 3: unique max at the very last element
    w, b = torch.ones(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    _, _, _, (pos,), _ = native.Launch(x, "range", 1.0, 1e-5, 10, False).forward(x, w, b)
    flat = x.transpose(0, 1).reshape(4, -1)
    expect_hi = [int(flat[c].argmax()) for c in range(4)]
    expect_lo = [int(flat[c].argmin()) for c in range(4)]
    expect_hi[1] = -(0 * S + 1) - 1
    expect_lo[2] = -(1 * S + 0) - 1
    assert pos.dtype == torch.int32 and pos.shape == (2, 4)
    assert pos[0].tolist() == expect_hi and pos[1].tolist() == expect_lo
    assert expect_hi[3] == 2 * S + 5
    _compare(x, "range")  # unique and tied channels in one call


def test_auto_takes_native_for_small_inputs_in_eager_mode_only():
    """Under AUTO_SMALL_BYTES "auto" takes the native kernels whatever the row length (an Inductor call costs
    more than the work there); traced (torch.compile) the row-length rule stands, and the result matches the
    reference either way."""
    x = torch.randn(64, 8, 2, 2)  # 16 B rows, 8 KB
    w, b = torch.ones(8), torch.zeros(8)
    assert x.numel() * 4 < native.AUTO_SMALL_BYTES and native.auto_prefers(x, "l1")
    assert dispatch._use_native("auto", x, w, b, "l1", 1, 1)
    big = torch.randn(native.AUTO_SMALL_BYTES // 16 + 1, 1, 2, 2)  # the same rows, just over the limit
    assert not native.auto_prefers(big, "l1")
    seen = []

    def traced(t):
        seen.append(native.auto_prefers(t, "l1"))
        return t * 2

    torch.compile(traced, backend="eager", fullgraph=True)(x)
    assert seen == [False]
    _compare(x * 2 + 1, "l1", impl="auto")



@pytest.mark.parametrize("layout", [None, torch.channels_last])
@pytest.mark.parametrize("norm", ["l2", "l1", "linf", "topk", "range"])
def test_float64_batches_near_the_formats_limit_normalize_right(norm, layout):
    """A finite float64 batch of magnitude 1e200 (σ̂² overflows double): the channel and rows kernels give the
    reference's output on the same batch — 1/hypot(σ̂, √eps), never σ̂², and l2's Σd² summed rescaled — and the
    running variance it cannot hold leaves every buffer unchanged."""
    kw = {"k": 5} if norm == "topk" else {}
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64) * 1e200
    if layout is not None:
        x = x.contiguous(memory_format=layout)
    m = nm.LpBatchNorm2d(3, norm=norm, dtype=torch.float64, impl="native", **kw)
    y = m(x)
    ref = nm.LpBatchNorm2d(3, norm=norm, dtype=torch.float64, impl="reference", **kw)(x)
    assert type(y.grad_fn).__name__ == "NativeBatchNormFunctionBackward"
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    assert m.skipped_batches == 1 and int(m.num_batches_tracked) == 0 and torch.equal(m.running_var, torch.ones(3))
