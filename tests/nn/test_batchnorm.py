import copy
import io
import pickle
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import normmatters as nm
from normmatters.nn import LpBatchNorm1d, LpBatchNorm2d, LpBatchNorm3d

NORMS = ["l2", "l1", "linf", "topk", "range", "mean"]


def _trained(norm, c=6, steps=3, **kw):
    m = LpBatchNorm2d(c, norm=norm, **kw)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-1, 1)
    for _ in range(steps):
        m(torch.randn(8, c, 5, 5) * 2 + 1)
    return m


@pytest.mark.parametrize("momentum", [0.1, None])
def test_l2_module_matches_nn_batchnorm_over_steps(momentum, device):
    # ours on the test device against nn.BatchNorm2d on the CPU, both in float64
    a = nn.BatchNorm2d(6, momentum=momentum, dtype=torch.float64)
    b = LpBatchNorm2d(6, norm="l2", momentum=momentum, dtype=torch.float64, device=device)
    with torch.no_grad():
        a.weight.uniform_(0.5, 1.5)
        a.bias.uniform_(-1, 1)
    b.load_state_dict(a.state_dict())
    for _ in range(4):
        x = torch.randn(8, 6, 5, 5, dtype=torch.float64, requires_grad=True)
        xb = x.detach().to(device).requires_grad_()
        ya, yb = a(x), b(xb)
        ga = torch.autograd.grad(ya.square().sum(), (x, a.weight, a.bias))
        gb = torch.autograd.grad(yb.square().sum(), (xb, b.weight, b.bias))
        torch.testing.assert_close(yb.cpu(), ya, atol=1e-10, rtol=1e-10)
        for u, v in zip(gb, ga):
            torch.testing.assert_close(u.cpu(), v, atol=1e-9, rtol=1e-9)
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(b, key).cpu(), getattr(a, key))
    a.eval(), b.eval()
    x = torch.randn(3, 6, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(b(x.to(device)).cpu(), a(x))


@pytest.mark.parametrize("norm", NORMS)
def test_state_dict_moves_both_ways_with_identical_eval_output(norm):
    ours = _trained(norm).eval()
    theirs = nn.BatchNorm2d(6)
    theirs.load_state_dict(ours.state_dict())
    theirs.eval()
    x = torch.randn(4, 6, 5, 5)
    if norm != "mean":
        assert torch.equal(theirs(x), ours(x))
    back = LpBatchNorm2d(6, norm=norm)
    back.load_state_dict(theirs.state_dict())
    back.eval()
    assert torch.equal(back(x), ours(x))


def test_track_running_stats_false_uses_batch_statistics():
    m = LpBatchNorm2d(3, norm="l1", track_running_stats=False)
    assert m.running_mean is None and m.num_batches_tracked is None
    x = torch.randn(4, 3, 2, 2)
    y_train = m(x)
    m.eval()
    torch.testing.assert_close(m(x), y_train)


def test_momentum_none_is_cumulative_average():
    m = LpBatchNorm1d(2, norm="range", momentum=None)
    xs = [torch.randn(16, 2) + i for i in range(3)]
    for x in xs:
        m(x)
    torch.testing.assert_close(m.running_mean, torch.stack([x.mean(0) for x in xs]).mean(0))
    assert m.num_batches_tracked.item() == 3


def test_reset_and_repr():
    m = _trained("topk", k=4)
    m.reset_running_stats()
    assert torch.equal(m.running_mean, torch.zeros(6)) and m.num_batches_tracked.item() == 0
    m.reset_parameters()
    assert torch.equal(m.weight, torch.ones(6)) and torch.equal(m.bias, torch.zeros(6))
    r = repr(LpBatchNorm2d(8, norm="topk", k=4, ghost_batch_size=16))
    assert r.startswith("LpBatchNorm2d(8, norm='topk', k=4, ghost_batch_size=16, eps=1e-05, momentum=0.1")
    assert "chunks=2" in repr(nm.RangeBatchNorm2d(8, chunks=2))


def test_aliases():
    for name, norm in [("L1", "l1"), ("Linf", "linf"), ("TopK", "topk"), ("Range", "range"), ("MeanOnly", "mean")]:
        for suffix, base in [("1d", LpBatchNorm1d), ("2d", LpBatchNorm2d), ("3d", LpBatchNorm3d)]:
            cls = getattr(nm, f"{name}BatchNorm{suffix}")
            m = cls(4)
            assert isinstance(m, base) and m.norm == norm
    with pytest.raises(ValueError, match="L1BatchNorm2d always uses norm='l1'"):
        nm.L1BatchNorm2d(4, norm="l2")


@pytest.mark.parametrize("norm", NORMS)
def test_deepcopy_and_pickle(norm):
    m = _trained(norm)
    for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        clone.eval(), m.eval()
        x = torch.randn(2, 6, 5, 5)
        assert torch.equal(clone(x), m(x))
    buf = io.BytesIO()
    torch.save(nm.L1BatchNorm2d(3), buf)
    buf.seek(0)
    assert isinstance(torch.load(buf, weights_only=False), nm.L1BatchNorm2d)


def test_dtype_and_device_arguments(device):
    m = LpBatchNorm2d(3, norm="l1", dtype=torch.float16, device=device)
    assert m.weight.dtype == torch.float16 and m.running_var.dtype == torch.float16
    assert {t.device for t in (*m.parameters(), *m.buffers())} == {torch.empty(0, device=device).device}
    y = m(torch.randn(4, 3, 5, 5, dtype=torch.float16, device=device))
    assert y.dtype == torch.float16 and y.device == m.weight.device and torch.isfinite(y).all()
    assert m.running_var.dtype == torch.float16 and (m.running_var != 1).all()
    m64 = LpBatchNorm2d(3).to(device, torch.float64)
    assert m64(torch.randn(4, 3, 2, 2, dtype=torch.float64, device=device)).dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_matches_nn_batchnorm_dtype_behaviour(dtype, device):
    conv = nn.Conv2d(3, 4, 3, device=device)
    bn, lp = nn.BatchNorm2d(4, device=device), LpBatchNorm2d(4, norm="l2", device=device)
    x = torch.randn(8, 3, 8, 8, device=device)
    with torch.autocast(device.type, dtype=dtype):
        h = conv(x)
        ya, yb = bn(h), lp(h)
    assert yb.dtype == ya.dtype
    torch.testing.assert_close(yb.float(), ya.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lp.running_var, bn.running_var, atol=1e-2, rtol=1e-2)
    assert lp.running_var.dtype == torch.float32


@pytest.mark.parametrize("cls,shape", [(LpBatchNorm1d, (4, 3)), (LpBatchNorm1d, (4, 3, 7)),
                                       (LpBatchNorm2d, (4, 3, 5, 5)), (LpBatchNorm3d, (4, 3, 2, 3, 3))])
def test_ranks(cls, shape):
    y = cls(3, norm="linf")(torch.randn(*shape))
    assert y.shape == shape


def test_errors_name_the_layer():
    with pytest.raises(ValueError, match=r"LpBatchNorm2d\(4, norm='l1'\): expected 4 channels in dim 1, got 5"):
        LpBatchNorm2d(4)(torch.randn(2, 5, 3, 3))
    with pytest.raises(ValueError, match=r"LpBatchNorm2d\(4, norm='l1'\): expected 4D input \(got 2D input"):
        LpBatchNorm2d(4)(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"expected 2D or 3D input \(got 4D"):
        LpBatchNorm1d(4)(torch.randn(2, 4, 1, 1))
    with pytest.raises(TypeError, match="floating-point input, got dtype torch.int64"):
        LpBatchNorm2d(4)(torch.ones(2, 4, 3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"L1BatchNorm1d\(4, norm='l1'\): expected more than 1 value per channel"):
        nm.L1BatchNorm1d(4).train()(torch.randn(1, 4))
    with pytest.raises(ValueError, match="unknown norm 'l7'"):
        LpBatchNorm2d(4, norm="l7")
    with pytest.raises(ValueError, match=r"TopKBatchNorm2d\(4, norm='topk'\): norm='topk' needs 1 <= k <= n"):
        nm.TopKBatchNorm2d(4, k=20)(torch.randn(2, 4, 2, 2))
    with pytest.raises(ValueError, match="chunks=3 must divide the batch size, got batch size 4"):
        nm.RangeBatchNorm2d(4, chunks=3)(torch.randn(4, 4, 2, 2))
    with pytest.raises(ValueError, match="ghost_batch_size=3 must divide the batch size, got batch size 4"):
        LpBatchNorm2d(4, ghost_batch_size=3)(torch.randn(4, 4, 2, 2))
    with pytest.raises(ValueError, match="k must be a positive int"):
        LpBatchNorm2d(4, norm="topk", k=0)
    with pytest.raises(ValueError, match="momentum must be in"):
        LpBatchNorm2d(4, momentum=2.0)
    # eval mode with tiny batches is fine (no statistics computed), k > n too
    m = nm.TopKBatchNorm2d(4, k=20).eval()
    assert m(torch.randn(1, 4, 1, 1)).shape == (1, 4, 1, 1)


@pytest.mark.parametrize("norm", NORMS)
def test_nan_batch_leaves_every_buffer_unchanged(norm):
    m = _trained(norm)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(8, 6, 5, 5)
    x[3, 2, 1, 1] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        m(x)  # the default ("skip"): silent, on the device, counted
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert m.skipped_batches == 1 and "_skipped" not in m.state_dict()
    m.nonfinite = "raise"
    with pytest.raises(nm.NonFiniteBatchError, match="LpBatchNorm2d"):
        m(x)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    m(torch.randn(8, 6, 5, 5))  # a good batch still updates
    assert m.num_batches_tracked.item() == before["num_batches_tracked"].item() + 1


# ---- laws (hypothesis) ---------------------------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(norm=st.sampled_from(NORMS[:-1]), scale=st.floats(0.01, 100), shift=st.floats(-50, 50),
       seed=st.integers(0, 2**16))
def test_invariant_to_input_scale_and_shift(norm, scale, shift, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 3, 4, generator=g, dtype=torch.float64)
    # eps > 0 is required in training (as nn.BatchNorm on torch 2.13); 1e-300 is 0 next to any σ̂² here
    m = LpBatchNorm1d(3, norm=norm, k=5, eps=1e-300, dtype=torch.float64)
    torch.testing.assert_close(m(x * scale + shift), m(x), atol=1e-8, rtol=1e-8)


@settings(max_examples=25, deadline=None)
@given(norm=st.sampled_from(NORMS), seed=st.integers(0, 2**16))
def test_permutation_equivariant_over_the_batch(norm, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 3, 5, generator=g, dtype=torch.float64)
    perm = torch.randperm(8, generator=g)
    m = LpBatchNorm1d(3, norm=norm, k=4, dtype=torch.float64)
    m2 = LpBatchNorm1d(3, norm=norm, k=4, dtype=torch.float64)
    torch.testing.assert_close(m2(x[perm]), m(x)[perm])
    torch.testing.assert_close(m2.running_mean, m.running_mean)
    torch.testing.assert_close(m2.running_var, m.running_var)


# ---- compile / export ----------------------------------------------------------------------------------

@pytest.mark.parametrize("norm,kw", [("l1", {}), ("topk", {"k": 3}), ("range", {"chunks": 2}),
                                     ("mean", {}), ("linf", {"momentum": None})])
def test_compile_fullgraph_train_and_eval_dynamic_batch(norm, kw, device):
    # compiled on the test device against the reference layer on the CPU in float64
    torch._dynamo.reset()
    ref = LpBatchNorm2d(4, norm=norm, impl="reference", dtype=torch.float64, **kw)
    m = LpBatchNorm2d(4, norm=norm, device=device, **kw)
    f = torch.compile(m, fullgraph=True)
    for batch in (4, 6, 8):
        x = torch.randn(batch, 4, 3, 3)
        xa, xb = x.double().requires_grad_(), x.to(device).requires_grad_()
        ya, yb = ref(xa), f(xb)
        torch.testing.assert_close(yb.cpu().double(), ya, atol=1e-5, rtol=1e-5)
        ya.sum().backward()
        yb.sum().backward()
        torch.testing.assert_close(xb.grad.cpu().double(), xa.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(m.running_var.cpu().double(), ref.running_var, atol=1e-6, rtol=1e-5)
    assert m.num_batches_tracked.item() == 3
    m.eval(), ref.eval()
    x = torch.randn(5, 4, 3, 3)
    torch.testing.assert_close(f(x.to(device)).cpu().double(), ref(x.double()), atol=1e-5, rtol=1e-5)


def test_compiled_layer_protects_buffers_from_nan(device):
    torch._dynamo.reset()
    m = LpBatchNorm2d(4, norm="l1", device=device)
    f = torch.compile(m, fullgraph=True)
    f(torch.randn(4, 4, 3, 3, device=device))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(4, 4, 3, 3, device=device)
    x[0, 0, 0, 0] = float("nan")
    f(x)  # no raise under compile (documented), but buffers stay intact
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


@pytest.mark.parametrize("norm", NORMS)
def test_export_eval(norm):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), LpBatchNorm2d(4, norm=norm), nn.ReLU())
    model(torch.randn(8, 3, 6, 6))
    model.eval()
    x = torch.randn(2, 3, 6, 6)
    ep = torch.export.export(model, (x,))
    torch.testing.assert_close(ep.module()(x), model(x))
