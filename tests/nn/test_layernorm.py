"""LpLayerNorm / LpRMSNorm / LpGroupNorm: parity with the stock layers for norm="l2", gradcheck for every
norm, Gaussian consistency per sample, module conventions and bad-input errors."""

import pytest
import torch
from torch import nn

import normmatters as nm

NORMS = ("l2", "l1", "linf", "topk", "range")


def _parity(ref, ours, x, atol=1e-10, gatol=1e-9, device="cpu"):
    """``ours`` on ``device`` against the stock layer ``ref`` on the CPU (same dtype, same parameters)."""
    with torch.no_grad():
        for p in ref.parameters():
            p.uniform_(0.5, 1.5)
    assert set(ref.state_dict()) == set(ours.state_dict())
    ours.load_state_dict(ref.state_dict())
    ours.to(device)
    xr, xo = x.clone().requires_grad_(), x.to(device).clone().requires_grad_()
    yr, yo = ref(xr), ours(xo)
    assert yr.dtype == yo.dtype and yr.shape == yo.shape and yo.device == xo.device
    torch.testing.assert_close(yo.cpu(), yr, atol=atol, rtol=0)
    if not x.dtype.is_floating_point or x.dtype in (torch.float16, torch.bfloat16):
        return
    g = torch.randn_like(yr)
    yr.backward(g)
    yo.backward(g.to(device))
    torch.testing.assert_close(xo.grad.cpu(), xr.grad, atol=gatol, rtol=0)
    for a, b in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(b.grad.cpu(), a.grad, atol=gatol, rtol=0)


@pytest.mark.parametrize("shape,ns", [((4, 7, 64), 64), ((3, 8, 16), (8, 16)), ((5, 3), 3), ((2, 2, 3, 4), (2, 3, 4))])
@pytest.mark.parametrize("affine,bias", [(True, True), (True, False), (False, False)])
def test_layer_norm_l2_equals_nn_layer_norm(shape, ns, affine, bias, device):
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64) * 2 + 0.5
    _parity(nn.LayerNorm(ns, elementwise_affine=affine, bias=bias, dtype=torch.float64),
            nm.LpLayerNorm(ns, norm="l2", elementwise_affine=affine, bias=bias, dtype=torch.float64), x,
            device=device)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
def test_layer_norm_l2_low_precision(dtype, atol, device):
    torch.manual_seed(0)
    x = (torch.randn(6, 32) * 3).to(dtype)
    _parity(nn.LayerNorm(32, dtype=dtype), nm.LpLayerNorm(32, norm="l2", dtype=dtype), x, atol=atol, gatol=1e-4,
            device=device)


@pytest.mark.parametrize("eps", [1e-6, None])
@pytest.mark.parametrize("affine", [True, False])
def test_rms_norm_l2_equals_nn_rms_norm(eps, affine, device):
    torch.manual_seed(0)
    x = torch.randn(4, 7, 64, dtype=torch.float64) * 2 + 0.5
    _parity(nn.RMSNorm(64, eps=eps, elementwise_affine=affine, dtype=torch.float64),
            nm.LpRMSNorm(64, norm="l2", eps=eps, elementwise_affine=affine, dtype=torch.float64), x,
            device=device)


@pytest.mark.parametrize("groups,channels,shape", [(4, 16, (3, 16, 5, 5)), (1, 6, (2, 6, 7)), (6, 6, (2, 6, 3, 2, 2))])
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_l2_equals_nn_group_norm(groups, channels, shape, affine, device):
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64) * 2 + 0.5
    _parity(nn.GroupNorm(groups, channels, affine=affine, dtype=torch.float64),
            nm.LpGroupNorm(groups, channels, norm="l2", affine=affine, dtype=torch.float64), x,
            device=device)


@pytest.mark.parametrize("norm", NORMS)
def test_gradcheck_every_norm(norm, device):
    torch.manual_seed(0)
    x = torch.randn(3, 12, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.rand(12, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(12, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: nm.lp_layer_norm(x, 12, w, b, norm=norm), (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w: nm.lp_rms_norm(x, 12, w, eps=1e-6, norm=norm), (x, w))
    xg = torch.randn(2, 4, 6, dtype=torch.float64, device=device, requires_grad=True)
    wg = torch.rand(4, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: nm.lp_group_norm(x, 2, w, None, norm=norm), (xg, wg))


def _tolerance(sigma):
    """4 standard errors of the Monte Carlo mean of σ̂ (relative), plus 0.1 % for the constants' approximation."""
    return 4 * (sigma.std() / sigma.mean()).item() / len(sigma) ** 0.5 + 1e-3


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("n", [64, 1024, 65536])
def test_layer_norm_gaussian_consistent(norm, n):
    torch.manual_seed(n)
    rows = max(32, 2**19 // n)
    x = torch.randn(rows, n, dtype=torch.float64) * 3 + 1
    y = nm.LpLayerNorm(n, norm=norm, elementwise_affine=False, dtype=torch.float64)(x)
    ref = nn.LayerNorm(n, elementwise_affine=False, dtype=torch.float64)(x)
    ratio = (y.std(dim=1).mean() / ref.std(dim=1).mean()).item()
    # output scale: within 2.5 % (Jensen: E[1/σ̂] > 1/E[σ̂] for a noisy σ̂) plus the Monte Carlo error
    assert abs(ratio - 1) < 0.025 + _tolerance(y.std(dim=1)), ratio
    # the consistency claim itself: E[σ̂] = E[s_n], σ̂ per row recovered as s_n · std(ref) / std(y)
    s = x.std(dim=1, correction=0)
    sigma = s * ref.std(dim=1) / y.std(dim=1)
    assert abs((sigma.mean() / s.mean()).item() - 1) < _tolerance(sigma)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("n", [64, 4096])
def test_rms_norm_gaussian_consistent(norm, n):
    torch.manual_seed(n)
    x = torch.randn(max(8, 2**18 // n), n, dtype=torch.float64) * 3
    y = nm.LpRMSNorm(n, norm=norm, elementwise_affine=False)(x)
    ref = nn.RMSNorm(n, elementwise_affine=False)(x)
    ratio = (y.std(dim=1).mean() / ref.std(dim=1).mean()).item()
    assert abs(ratio - 1) < 0.025 + _tolerance(y.std(dim=1)), ratio
    rms = x.square().mean(dim=1).sqrt()
    sigma = rms * ref.std(dim=1) / y.std(dim=1)
    assert abs((sigma.mean() / rms.mean()).item() - 1) < _tolerance(sigma)


@pytest.mark.parametrize("norm", NORMS)
def test_constant_row_finite_with_finite_gradient(norm, device):
    x = torch.full((2, 16), 3.0, dtype=torch.float64, device=device, requires_grad=True)
    y = nm.LpLayerNorm(16, norm=norm, dtype=torch.float64, device=device)(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert torch.equal(y, torch.zeros_like(y))


def test_huge_input_no_overflow(device):
    x = torch.randn(2, 32, device=device) * 1e30
    for norm in NORMS:
        assert torch.isfinite(nm.LpLayerNorm(32, norm=norm, device=device)(x)).all()
        assert torch.isfinite(nm.LpRMSNorm(32, norm=norm, device=device)(x)).all()


def test_module_conventions():
    m = nm.LpLayerNorm((4, 5), norm="linf", elementwise_affine=True, bias=False, dtype=torch.float64)
    assert m.weight.shape == (4, 5) and m.bias is None and m.weight.dtype == torch.float64
    assert list(m.state_dict()) == ["weight"]
    with torch.no_grad():
        m.weight.fill_(2)
    m.reset_parameters()
    assert torch.equal(m.weight, torch.ones(4, 5, dtype=torch.float64))
    assert "norm='linf'" in repr(m) and "(4, 5)" in repr(m)
    r = nm.LpRMSNorm(8)
    assert r.norm == "l1" and r.eps is None and list(r.state_dict()) == ["weight"]
    g = nm.LpGroupNorm(2, 4, affine=False)
    assert list(g.state_dict()) == [] and "norm='l1'" in repr(g)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="LpLayerNorm.*trailing shape \\[8\\]"):
        nm.LpLayerNorm(8)(torch.randn(2, 7))
    with pytest.raises(ValueError, match="LpRMSNorm.*trailing shape"):
        nm.LpRMSNorm((2, 4))(torch.randn(2, 8))
    with pytest.raises(ValueError, match="LpGroupNorm.*num_groups=3.*num_channels=16"):
        nm.LpGroupNorm(3, 16)
    with pytest.raises(ValueError, match="LpGroupNorm.*\\(N, 16, \\*\\)"):
        nm.LpGroupNorm(4, 16)(torch.randn(2, 8, 3))
    with pytest.raises(ValueError, match="LpLayerNorm.*unknown norm 'l3'"):
        nm.LpLayerNorm(8, norm="l3")
    with pytest.raises(ValueError, match="LpLayerNorm.*'mean'"):
        nm.LpLayerNorm(8, norm="mean")
    with pytest.raises(ValueError, match="LpLayerNorm.*at least 2"):
        nm.LpLayerNorm(1)
    with pytest.raises(ValueError, match="LpLayerNorm.*normalized_shape"):
        nm.LpLayerNorm((0,))
    with pytest.raises(ValueError, match="LpLayerNorm.*topk.*k=10, n=6"):
        nm.LpLayerNorm(6, norm="topk")
    g = nm.LpGroupNorm(2, 8, norm="topk")  # n is known per input: 4 channels x 3 = 12 >= k, 4 x 1 < k
    assert g(torch.randn(2, 8, 3)).shape == (2, 8, 3)
    with pytest.raises(ValueError, match="LpGroupNorm.*k=10, n=4"):
        g(torch.randn(2, 8, 1))
    with pytest.raises(ValueError, match="lp_group_norm.*must divide"):
        nm.lp_group_norm(torch.randn(2, 6, 3), 4)


@pytest.mark.parametrize("cls,args", [(nm.LpLayerNorm, (12,)), (nm.LpRMSNorm, (12,)), (nm.LpGroupNorm, (2, 4))])
def test_estimator_options_and_impl(cls, args):
    x = torch.randn(3, 4, 12) if cls is not nm.LpGroupNorm else torch.randn(3, 4, 6)
    top = cls(*args, norm="topk", k=2)
    assert "k=2" in repr(top)
    rng = cls(*args, norm="range", chunks=3, impl="eager")
    assert "chunks=3" in repr(rng) and "impl='eager'" in repr(rng) and "k=" not in repr(rng)
    ref = cls(*args, norm="range", chunks=3, impl="reference")
    torch.testing.assert_close(rng(x), ref(x))
    with pytest.raises(ValueError, match=f"{cls.__name__}: chunks is an option of norm='range' only"):
        cls(*args, norm="l1", chunks=2)
    with pytest.raises(ValueError, match=f"{cls.__name__}: k must be a positive int"):
        cls(*args, norm="topk", k=0)
    with pytest.raises(ValueError, match=f"{cls.__name__}: impl must be one of"):
        cls(*args, impl="fast")


def test_chunks_must_divide_the_first_normalized_dim():
    with pytest.raises(ValueError, match=r"LpLayerNorm: chunks=3 must divide the first normalized dim \(4\)"):
        nm.LpLayerNorm((4, 6), norm="range", chunks=3)
    with pytest.raises(ValueError, match="LpLayerNorm: norm='topk' needs 1 <= k <= n"):
        nm.LpLayerNorm(6, norm="topk", k=7)


def test_group_norm_bias_false_is_nn_group_norms():
    ref, ours = nn.GroupNorm(2, 4, bias=False).double(), nm.LpGroupNorm(2, 4, norm="l2", bias=False).double()
    assert ours.bias is None and list(ours.state_dict()) == list(ref.state_dict()) == ["weight"]
    _parity(ref, ours, torch.randn(3, 4, 5, dtype=torch.float64))
    assert "bias=False" in repr(ours)
    with pytest.raises(RuntimeError, match="bias"):  # a state_dict with a bias does not fit
        ours.load_state_dict(nn.GroupNorm(2, 4).state_dict())


LAYERS = [lambda **kw: nm.LpLayerNorm(8, **kw), lambda **kw: nm.LpRMSNorm(8, **kw),
          lambda **kw: nm.LpGroupNorm(2, 8, **kw)]


@pytest.mark.parametrize("make", LAYERS)
def test_eps_refused_at_construction_and_assignment(make):
    name = type(make()).__name__
    for eps in (0.0, -1.0, float("nan"), float("inf"), "1e-5"):
        with pytest.raises(ValueError, match=f"{name}: eps must be a positive finite number"):
            make(eps=eps)
    layer = make(eps=1e-3)
    with pytest.raises(ValueError, match=f"{name}: eps"):
        layer.eps = 0
    assert layer.eps == 1e-3 and "eps=0.001" in repr(layer)
    layer.eps = 1e-2
    assert layer.eps == 1e-2


@pytest.mark.parametrize("make", LAYERS)
def test_empty_batch_and_integer_input(make):
    layer = make()
    x = torch.randn(0, 8, 3, requires_grad=True) if isinstance(layer, nm.LpGroupNorm) else \
        torch.randn(0, 8, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape
    with pytest.raises(TypeError, match=f"{type(layer).__name__}: expected a floating-point input, got torch.int64"):
        layer(torch.ones(2, 8, 3, dtype=torch.int64))


def test_path_decided_once_per_device_dtype_training(monkeypatch):
    layer = nm.LpLayerNorm(8)
    layer(torch.randn(2, 8))
    layer(torch.randn(2, 8, dtype=torch.float64))
    layer.eval()(torch.randn(2, 8))
    assert set(layer._paths) == {(torch.device("cpu"), torch.float32, True), (torch.device("cpu"), torch.float64, True),
                                 (torch.device("cpu"), torch.float32, False)}
    monkeypatch.setenv("NORMMATTERS_KERNEL", "bogus")  # read on first sight only
    layer(torch.randn(2, 8))
    layer.impl = "reference"  # an option the path depends on: decided again
    assert layer._paths == {}
    layer(torch.randn(2, 8))
    assert set(layer._paths.values()) == {"reference"}


class _HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
             torch.ops.aten.item.default)

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in self.READS
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("impl", [None, "eager", "compiled"])
def test_no_host_read_in_a_training_step(impl):
    kw = {"impl": impl} if impl else {}
    cases = [(nm.LpLayerNorm(16, norm="l1", **kw), (6, 16))]
    if impl != "compiled":  # compiled: one compile keeps the test fast
        cases += [(nm.LpGroupNorm(2, 4, norm="l1", **kw), (3, 4, 4))]
        cases += [(nm.LpRMSNorm(16, norm=norm, **kw), (6, 16)) for norm in ("l2", "topk", "range")]
        cases += [(nm.LpLayerNorm(16, norm=norm, **kw), (6, 16)) for norm in ("l2", "linf", "topk", "range")]
    for layer, shape in cases:
        x = torch.randn(*shape, requires_grad=True)
        layer(x).sum().backward()  # warm-up: builds, compiles, decides the path
        with _HostReads() as reads:
            layer(x).sum().backward()
        assert reads.count == 0, repr(layer)
