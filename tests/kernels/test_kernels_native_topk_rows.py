"""The rows kernels' top-k forward through the insertion network (csrc/topk_net.h: float32 and bfloat16
elements, k ≤ 12, 8 channels per vector) against the reference path: channel counts with and without a
partial last group of 8, every k the network covers and the first it does not (the list-and-threshold
fallback), ties, one and two threads, and non-finite batches."""

import pytest
import torch

import normmatters as nm
from normmatters.kernels import lean_batch_norm, native

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels unavailable (no compiler)")


def _step(x0, impl, k, w0, b0, g):
    x = x0.clone().requires_grad_()
    w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
    C = x0.shape[1]
    rm, rv = torch.zeros(C), torch.ones(C)
    if impl == "reference":
        y = nm.lp_batch_norm(x, rm, rv, w, b, training=True, norm="topk", k=k)
    else:
        y = lean_batch_norm(x, rm, rv, w, b, training=True, norm="topk", k=k, impl=impl)
    y.backward(g)
    return y.grad_fn, (y.detach(), x.grad, w.grad, b.grad, rm, rv)


def _compare(x0, k, tol=None, against="reference"):
    C = x0.shape[1]
    w0 = torch.rand(C) + 0.5
    b0 = torch.randn(C)
    g = torch.randn_like(x0)
    fn, got = _step(x0, "native", k, w0, b0, g)
    _, ref = _step(x0, against, k, w0, b0, g)
    assert type(fn).__name__ == "NativeBatchNormFunctionBackward"
    tol = tol or dict(rtol=1e-4, atol=1e-4)
    for name, a, r in zip(("y", "grad x", "grad w", "grad b", "running_mean", "running_var"), got, ref):
        torch.testing.assert_close(a.float(), r.float(), **tol, msg=lambda m, name=name: f"k={k} {name}: {m}")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("k", [1, 3, 10, 12, 13])
@pytest.mark.parametrize("shape", [(40, 16), (37, 21), (5, 3, 4, 4)])
def test_rows_topk_matches_reference(shape, k, threads):
    """(N, C) with whole groups of 8 channels, with a partial last group, channels_last with fewer than 8."""
    x = torch.randn(shape) * 2 + 1
    if x.dim() == 4:
        x = x.to(memory_format=torch.channels_last)
    assert native.channels_innermost(x)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _compare(x, k)
    finally:
        torch.set_num_threads(before)


def test_rows_topk_keeps_tied_values():
    """Ties among the largest |d| (and at the k-th) count as often as they occur. Autograd through torch.topk
    (the reference) gives the k-th's gradient to the tied elements it picks, the lean formulas share it among
    all of them, so the ties are checked against the eager lean formulas (as in test_kernels_native.py)."""
    x = torch.randn(64, 24)
    x[:5, :] = 6.0
    x[5:9, :] = -6.0
    x[9:12, 3] = 6.0
    _compare(x, 10, tol=dict(rtol=1e-4, atol=1e-3), against="eager")


def test_rows_topk_bfloat16_matches_float32_of_the_same_values():
    """bfloat16 elements are widened to float32 in the network: the statistic equals that of the float32 copy."""
    x = torch.randn(48, 20).bfloat16()
    C = x.shape[1]
    w, b = torch.ones(C), torch.zeros(C)
    y16 = lean_batch_norm(x, None, None, w, b, training=True, norm="topk", k=10, impl="native")
    y32 = lean_batch_norm(x.float(), None, None, w, b, training=True, norm="topk", k=10, impl="native")
    torch.testing.assert_close(y16.float(), y32, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_rows_topk_nonfinite_channel_raises_and_keeps_buffers(value):
    """A non-finite element makes μ non-finite, which the network does not order: the statistic of that
    channel is NaN, the batch is reported and the buffers stay as they were."""
    C = 17
    bad = torch.randn(30, C)
    bad[4, 9] = value
    rm, rv, nbt = torch.zeros(C), torch.ones(C), torch.tensor(3)
    with pytest.raises(nm.NonFiniteBatchError):
        lean_batch_norm(bad, rm, rv, training=True, norm="topk", k=10, num_batches_tracked=nbt, impl="native",
                        nonfinite="raise")
    assert torch.equal(rm, torch.zeros(C)) and torch.equal(rv, torch.ones(C)) and nbt.item() == 3


def test_rows_topk_gradcheck():
    """float64 elements take the list-and-threshold loop; float32 the network: both once differentiable
    with the reference's gradient (float64 gradcheck on the rows layout)."""
    x = torch.randn(24, 10, dtype=torch.float64, requires_grad=True)
    w = torch.rand(10, dtype=torch.float64, requires_grad=True)
    b = torch.randn(10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, w, b: lean_batch_norm(t, None, None, w, b, training=True,
                                                                    norm="topk", k=5, impl="native"),
                                    (x, w, b), eps=1e-6, atol=1e-6)
