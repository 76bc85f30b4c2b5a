import math

import pytest
import torch

from normmatters.optim import equilibrium_angular_update, equilibrium_norm


def test_formulas():
    assert equilibrium_angular_update(0.1, 5e-4, 0.9) == pytest.approx(math.sqrt(2 * 0.1 * 5e-4 / 1.9), rel=1e-12)
    assert equilibrium_angular_update(0.1, 5e-4) == pytest.approx(math.sqrt(1e-4), rel=1e-12)
    assert equilibrium_norm(0.1, 5e-4, 0.9, 2.0) == pytest.approx((0.1 * 4.0 / (2 * 5e-4 * 0.1)) ** 0.25, rel=1e-12)
    # scale laws: the norm grows as √G; the angular update does not depend on G
    assert equilibrium_norm(0.01, 0.1, 0.5, 9.0) / equilibrium_norm(0.01, 0.1, 0.5, 1.0) == pytest.approx(3.0)


@pytest.mark.parametrize("bad", [dict(lr=0.0), dict(weight_decay=0.0), dict(momentum=1.0), dict(lr=math.inf)])
def test_argument_errors(bad):
    args = {"lr": 0.1, "weight_decay": 1e-3, "momentum": 0.9, **bad}
    with pytest.raises(ValueError, match=next(iter(bad))):
        equilibrium_angular_update(**args)
    with pytest.raises(ValueError, match="grad_norm"):
        equilibrium_norm(0.1, 1e-3, 0.9, -1.0)


def _simulate(lr, lam, mu, g_unit, steps, channels=256, dim=64, init=0.3):
    """A scale-invariant toy under torch's SGD with coupled decay: each channel's gradient is random,
    orthogonal to it, of norm g_unit/‖w_c‖. Returns the mean norm and the mean angular update per step
    (radians) over the second half of the run."""
    gen = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(channels, dim, generator=gen, dtype=torch.float64) * init / math.sqrt(dim))
    opt = torch.optim.SGD([w], lr=lr, momentum=mu, weight_decay=lam)
    norms, angles = [], []
    for t in range(steps):
        n = w.detach().norm(dim=1, keepdim=True)
        u = w.detach() / n
        xi = torch.randn(channels, dim, generator=gen, dtype=torch.float64)
        xi -= (xi * u).sum(1, keepdim=True) * u
        w.grad = g_unit * xi / xi.norm(dim=1, keepdim=True) / n
        before = w.detach().clone()
        opt.step()
        if t >= steps // 2:
            norms.append(n.mean().item())
            cos = torch.nn.functional.cosine_similarity(before, w.detach(), dim=1).clamp(-1, 1)
            angles.append(torch.acos(cos).mean().item())
    return sum(norms) / len(norms), sum(angles) / len(angles)


@pytest.mark.parametrize("lr,lam,mu,g_unit", [(0.01, 0.01, 0.9, 1.0), (0.1, 0.01, 0.0, 2.0), (0.02, 0.05, 0.5, 0.5)])
def test_simulation_reaches_the_equilibrium(lr, lam, mu, g_unit):
    # from a norm far below it (init 0.3): the run must grow to the predicted norm, ~8 relaxation times
    steps = int(8 * (1 - mu) / (4 * lr * lam)) * 2
    norm, angle = _simulate(lr, lam, mu, g_unit, steps)
    assert norm == pytest.approx(equilibrium_norm(lr, lam, mu, g_unit), rel=0.03)
    assert angle == pytest.approx(equilibrium_angular_update(lr, lam, mu), rel=0.03)


def test_momentum_enters_as_predicted():
    # the (1-μ) in the norm and the (1+μ) in the angle are what the simulation shows: leaving them out
    # would be off by 10^(1/4) = 1.78 and √1.9 = 1.38 at μ = 0.9
    norm, angle = _simulate(0.01, 0.01, 0.9, 1.0, 2000)
    assert norm / equilibrium_norm(0.01, 0.01, 0.0, 1.0) == pytest.approx(10**0.25, rel=0.03)
    assert equilibrium_angular_update(0.01, 0.01, 0.0) / angle == pytest.approx(math.sqrt(1.9), rel=0.03)
