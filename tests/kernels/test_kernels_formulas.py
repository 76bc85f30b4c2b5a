"""The lean kernels' math (normmatters.kernels.formulas), called directly on (G, m, q, C, S) views on the test
device, against the reference path (autograd through lp_batch_norm) on the CPU in float64."""

import pytest
import torch

from normmatters.functional import lp_batch_norm
from normmatters.kernels import formulas, gaussian_constant

NORMS = ["l2", "l1", "linf", "topk", "range", "mean"]
K = 3
TOL = {"rtol": 1e-9, "atol": 1e-10}
DIVIDING = [n for n in NORMS if n != "mean"]


def _case(device, shape=(6, 3, 4, 5)):
    x = torch.randn(shape, dtype=torch.float64) * 2 + 0.5
    w = torch.rand(shape[1], dtype=torch.float64) + 0.5
    b = torch.randn(shape[1], dtype=torch.float64)
    g = torch.randn(shape, dtype=torch.float64)
    return x, w, b, g, [t.to(device) for t in (x, w, b, g)]


def _view5(t):
    return t.contiguous().view(1, 1, t.shape[0], t.shape[1], -1)


def _reference(x, w, b, g, norm):
    x, w, b = (t.clone().requires_grad_() for t in (x, w, b))
    y = lp_batch_norm(x, None, None, w, b, True, norm=norm, k=K)
    return (y.detach(), *torch.autograd.grad(y, (x, w, b), g))


def _c(norm, x):
    return gaussian_constant(norm, x.numel() // x.shape[1], K, None, x.dtype, x.device)


@pytest.mark.parametrize("norm", NORMS)
def test_forward_and_backward_match_the_reference(norm, device):
    x, w, b, g, (xd, wd, bd, gd) = _case(device)
    y_ref, gx_ref, gw_ref, gb_ref = _reference(x, w, b, g, norm)
    c = _c(norm, xd)
    y5, mean, raw, aux = formulas.forward(_view5(xd), wd, bd, c, 1e-5, norm, K)
    assert y5.device == xd.device and mean.numel() == raw.numel() == 3
    torch.testing.assert_close(y5.reshape(x.shape).cpu(), y_ref, **TOL)
    torch.testing.assert_close(mean.reshape(-1).cpu(), x.mean((0, 2, 3)), **TOL)
    gx5, gw, gb = formulas.backward(_view5(gd), _view5(xd), wd, mean, raw, aux, c, 1e-5, norm, K, True, True)
    torch.testing.assert_close(gx5.reshape(x.shape).cpu(), gx_ref, **TOL)
    torch.testing.assert_close(gw.cpu(), gw_ref, **TOL)
    torch.testing.assert_close(gb.cpu(), gb_ref, **TOL)
    _, gw_none, gb_none = formulas.backward(_view5(gd), _view5(xd), wd, mean, raw, aux, c, 1e-5, norm, K, False,
                                            False)
    assert gw_none is None and gb_none is None


@pytest.mark.parametrize("norm", NORMS)
def test_inplace_pair_equals_forward_and_backward(norm, device):
    """stats + forward_inplace write forward's y into the input; backward_inplace from y gives backward's
    gradients (d rebuilt from the output, weights non-zero)."""
    x, w, b, g, (xd, wd, bd, gd) = _case(device)
    c = _c(norm, xd)
    y5, mean, raw, aux = formulas.forward(_view5(xd), wd, bd, c, 1e-5, norm, K)
    gx5, gw, gb = formulas.backward(_view5(gd), _view5(xd), wd, mean, raw, aux, c, 1e-5, norm, K, True, True)
    buf = _view5(xd.clone())
    m2, r2 = formulas.stats(buf, norm, K)
    torch.testing.assert_close(m2, mean, **TOL)
    formulas.forward_inplace(buf, wd, bd, m2, r2, c, 1e-5, norm)
    torch.testing.assert_close(buf, y5, **TOL)
    raw_in = r2 if norm in DIVIDING else None
    gxi, gwi, gbi = formulas.backward_inplace(_view5(gd), buf, wd, bd, raw_in, c, 1e-5, norm, K, True, True)
    torch.testing.assert_close(gxi, gx5, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(gwi, gw, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(gbi, gb, rtol=1e-7, atol=1e-8)


def test_ghost_groups_have_their_own_statistics(device):
    x, w, b, g, (xd, wd, bd, _) = _case(device, shape=(8, 3, 2, 2))
    c = gaussian_constant("l1", 4 * 4, K, None, xd.dtype, xd.device)  # 4 samples × 4 pixels per group
    y5, mean, _, _ = formulas.forward(xd.view(2, 1, 4, 3, 4), wd, bd, c, 1e-5, "l1", K)
    for i, half in enumerate((x[:4], x[4:])):
        ref = lp_batch_norm(half, None, None, w, b, True, norm="l1")
        torch.testing.assert_close(y5[i].reshape(half.shape).cpu(), ref, **TOL)
        torch.testing.assert_close(mean[i].reshape(-1).cpu(), half.mean((0, 2, 3)), **TOL)


def test_update_running_is_the_reference_update_and_skips_nonfinite(device):
    x = torch.randn(6, 3, 4, 5, dtype=torch.float64)
    rm_ref, rv_ref = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    lp_batch_norm(x, rm_ref, rv_ref, None, None, True, 0.1, norm="l1")
    xd = x.to(device)
    c = _c("l1", xd)
    _, mean, raw, _ = formulas.forward(_view5(xd), torch.ones(3, dtype=xd.dtype, device=device),
                                       torch.zeros(3, dtype=xd.dtype, device=device), c, 1e-5, "l1", K)
    rm, rv = torch.zeros(3, dtype=xd.dtype, device=device), torch.ones(3, dtype=xd.dtype, device=device)
    nbt = torch.zeros((), dtype=torch.long, device=device)
    ok = formulas.update_running(mean.reshape(1, 3), raw.reshape(1, 3), c, rm, rv, nbt, 0.1, 120, True)
    assert bool(ok) and nbt.item() == 1
    torch.testing.assert_close(rm.cpu(), rm_ref, **TOL)
    torch.testing.assert_close(rv.cpu(), rv_ref, **TOL)
    before = (rm.clone(), rv.clone())
    nan = torch.full((1, 3), float("nan"), dtype=xd.dtype, device=device)
    ok = formulas.update_running(nan, raw.reshape(1, 3), c, rm, rv, nbt, 0.1, 120, True)
    assert not bool(ok) and nbt.item() == 1
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])
