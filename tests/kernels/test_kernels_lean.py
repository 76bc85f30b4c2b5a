"""The lean kernels against the reference path (values, gradients, running statistics) and gradcheck.

Shapes are small and the compiled tests reuse one shape per layout so each norm compiles once or twice.
"""

from __future__ import annotations

import pytest
import torch

import normmatters as nm
from normmatters.functional import lp_batch_norm
from normmatters.kernels import LeanBatchNormFunction, gaussian_constant, lean_batch_norm

NORMS = ["l2", "l1", "linf", "topk", "range", "mean"]
K = 4


def _run(fn, x, w, b, g, *, norm, device, dtype=None, dtype_stats=None, **kw):
    """One training step of ``fn`` on ``device`` (inputs cast to ``dtype`` if given; buffers from the CPU
    generator, so both paths start from the same values)."""
    sd = dtype_stats or (x.dtype if x.dtype == torch.float64 else torch.float32)
    C = x.shape[1]
    rm = torch.randn(C, dtype=sd)
    rv = torch.rand(C, dtype=sd) + 0.5
    if dtype is not None:
        x, w, b, g, rm, rv = (t.to(dtype) for t in (x, w, b, g, rm, rv))
    x, w, b, g, rm, rv = (t.to(device) for t in (x, w, b, g, rm, rv))
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    b = b.detach().clone().requires_grad_()
    nbt = torch.zeros((), dtype=torch.long, device=device)
    y = fn(x, rm, rv, w, b, True, 0.1, 1e-5, norm, k=K, num_batches_tracked=nbt, **kw)
    y.backward(g)
    return {"y": y, "gx": x.grad, "gw": w.grad, "gb": b.grad, "rm": rm, "rv": rv, "nbt": nbt}


def _compare(norm, impl, x, tol, *, device="cpu", memory_format=None, **kw):
    """``lean_batch_norm(impl)`` on ``device`` against the reference path on the CPU in float64."""
    C = x.shape[1]
    w = torch.randn(C, dtype=torch.float32 if x.dtype != torch.float64 else x.dtype)
    b = torch.randn_like(w)
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    g = torch.randn(x.shape, dtype=x.dtype)
    torch.manual_seed(1)
    ref = _run(lp_batch_norm, x, w, b, g, norm=norm, device="cpu", dtype=torch.float64, **kw)
    torch.manual_seed(1)
    out = _run(lean_batch_norm, x, w, b, g, norm=norm, device=device, impl=impl, **kw)
    dtypes = {"y": x.dtype, "gx": x.dtype, "gw": w.dtype, "gb": b.dtype, "nbt": torch.long,
              "rm": x.dtype if x.dtype == torch.float64 else torch.float32}
    dtypes["rv"] = dtypes["rm"]
    for key in ref:
        assert out[key].dtype == dtypes[key], key
        assert out[key].device.type == torch.device(device).type, key
        torch.testing.assert_close(out[key].cpu().to(ref[key].dtype), ref[key], **tol,
                                   msg=lambda m, key=key: f"{norm} {key}: {m}")
    if memory_format is not None:
        assert out["y"].is_contiguous(memory_format=memory_format)
        assert out["gx"].is_contiguous(memory_format=memory_format)


F64 = {"rtol": 1e-9, "atol": 1e-10}
F32 = {"rtol": 2e-4, "atol": 2e-5}
# bfloat16 output has 8 significant bits: the lean and reference paths agree to within one rounding of the
# bf16 result (both accumulate in float32 and differ only in float32 rounding before the final cast).
BF16 = {"rtol": 1.6e-2, "atol": 1.6e-2}


@pytest.mark.parametrize("norm", NORMS)
def test_eager_matches_reference_float64(norm, device):
    _compare(norm, "eager", torch.randn(6, 3, 4, 5, dtype=torch.float64) * 3 + 1, F64, device=device)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("case", ["ghost", "1d", "3d", "channels_last"])
def test_eager_options_match_reference(norm, case, device):
    x = torch.randn(8, 3, 4, 5, dtype=torch.float64)
    kw = {}
    if case == "ghost":
        kw["ghost_batch_size"] = 2
    elif case == "1d":
        x = torch.randn(32, 3, dtype=torch.float64)
    elif case == "3d":
        x = torch.randn(4, 3, 2, 3, 4, dtype=torch.float64)
    elif case == "channels_last":
        kw["memory_format"] = torch.channels_last
    _compare(norm, "eager", x, F64, device=device, **kw)


@pytest.mark.parametrize("chunks,ghost", [(2, None), (4, None), (2, 4)])
def test_eager_range_chunks_match_reference(chunks, ghost, device):
    x = torch.randn(8, 3, 4, 5, dtype=torch.float64)
    _compare("range", "eager", x, F64, chunks=chunks, ghost_batch_size=ghost, device=device)
    _compare("range", "eager", x, F64, chunks=chunks, ghost_batch_size=ghost,
             memory_format=torch.channels_last, device=device)


@pytest.mark.parametrize("norm", NORMS)
def test_compiled_matches_reference_float32(norm, device):
    x = torch.randn(8, 4, 6, 6) * 2 + 0.5
    _compare(norm, "compiled", x, F32, device=device)
    _compare(norm, "compiled", x, F32, memory_format=torch.channels_last, device=device)


@pytest.mark.parametrize("norm", ["l1", "range", "topk"])
def test_compiled_ghost_chunks_and_batch_sizes(norm, device):
    # a second and third batch size must not need a recompilation per size (automatic dynamic shapes)
    kw = {"chunks": 2} if norm == "range" else {}
    for n in (8, 4, 12):
        _compare(norm, "compiled", torch.randn(n, 4, 6, 6), F32, ghost_batch_size=4, device=device, **kw)


@pytest.mark.parametrize("norm", NORMS)
def test_compiled_bfloat16_within_tolerance(norm, device):
    x = (torch.randn(8, 4, 6, 6) * 2 + 0.5).to(torch.bfloat16)
    _compare(norm, "compiled", x, BF16, device=device)


@pytest.mark.parametrize("norm", NORMS)
def test_gradcheck_float64(norm, device):
    x = (torch.randn(4, 2, 3, 3, dtype=torch.float64) * 2).to(device).requires_grad_()
    w = (torch.rand(2, dtype=torch.float64) + 0.5).to(device).requires_grad_()
    b = torch.randn(2, dtype=torch.float64).to(device).requires_grad_()
    n = 2 * 9  # two ghost groups of 2 samples
    c = gaussian_constant(norm, n, K, None, x.dtype, x.device)

    def f(x, w, b):
        return LeanBatchNormFunction.apply(x, w, b, c, 1e-5, norm, K, 2, 1, "eager")[0]

    assert torch.autograd.gradcheck(f, (x, w, b), eps=1e-6, atol=1e-6)


def test_gradcheck_range_chunks_and_channels_last(device):
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64).to(device).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.rand(2, dtype=torch.float64).to(device).requires_grad_()
    b = torch.randn(2, dtype=torch.float64).to(device).requires_grad_()
    c = gaussian_constant("range", 36, K, 2, x.dtype, x.device)

    def f(x, w, b):
        return LeanBatchNormFunction.apply(x, w, b, c, 1e-5, "range", K, 1, 2, "eager")[0]

    assert torch.autograd.gradcheck(f, (x, w, b), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("norm", ["linf", "range"])
def test_tied_extremes_share_the_gradient_like_autograd(norm, device):
    # several elements equal to the channel's max / min: autograd of amax/amin splits the gradient evenly
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    x[0, :, 0, 0] = 5.0
    x[1, :, 2, 1] = 5.0
    x[2, :, 1, 1] = -3.0
    x[3, :, 0, 2] = -3.0
    _compare(norm, "eager", x, F64, device=device)


def test_topk_tie_gradient_is_the_average_over_tie_breaks(device):
    # three tied largest |d| with k = 2: the lean backward gives the average of the gradients of the three
    # ways to break the tie, i.e. the mean of the reference's gradients at the three perturbed inputs
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    x[0, 0, 0, :3] = 10.0
    g = torch.randn_like(x)
    xl = x.to(device).requires_grad_()
    y = lean_batch_norm(xl, None, None, None, None, True, norm="topk", k=2, impl="eager")
    torch.testing.assert_close(y.cpu(), lp_batch_norm(x, None, None, None, None, True, norm="topk", k=2),
                               rtol=1e-12, atol=1e-12)
    (gx,) = torch.autograd.grad(y, xl, g.to(device))
    grads = []
    for j in range(3):
        xp = x.clone()
        xp[0, 0, 0, j] -= 1e-9  # element j drops out of the top 2
        xp.requires_grad_()
        yp = lp_batch_norm(xp, None, None, None, None, True, norm="topk", k=2)
        grads.append(torch.autograd.grad(yp, xp, g)[0])
    torch.testing.assert_close(gx.cpu(), torch.stack(grads).mean(0), rtol=1e-6, atol=1e-6)


def test_compiled_fullgraph_has_no_graph_break_and_dynamic_batch(device):
    # the compiled model on the test device against the reference layers on the CPU in float64
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), nm.LpBatchNorm2d(4, norm="l1"),
                                torch.nn.ReLU(), nm.LpBatchNorm2d(4, norm="range"))
    ref_model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1),
                                    nm.LpBatchNorm2d(4, norm="l1", impl="reference"), torch.nn.ReLU(),
                                    nm.LpBatchNorm2d(4, norm="range", impl="reference"))
    ref_model.load_state_dict(model.state_dict())
    model.to(device)
    ref_model.double()
    cmodel = torch.compile(model, fullgraph=True, dynamic=True, backend="aot_eager")
    for n in (4, 6, 8):
        x = torch.randn(n, 3, 5, 5)
        y = cmodel(x.to(device))
        y.sum().backward()
        yr = ref_model(x.double())
        yr.sum().backward()
        torch.testing.assert_close(y.cpu().double(), yr, rtol=1e-4, atol=1e-5)
    for p, pr in zip(model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p.grad.cpu().double(), pr.grad, rtol=1e-4, atol=1e-4)
    for b, br in zip(model.buffers(), ref_model.buffers(), strict=True):
        torch.testing.assert_close(b.cpu().to(br.dtype), br, rtol=1e-5, atol=1e-6)
