import math

import torch
from checks import consistent, monte_carlo_raw

from normmatters.estimators import get_estimator


def test_l2_is_the_biased_std(gaussian):
    x = gaussian(16, 50)
    est = get_estimator("l2")
    assert torch.allclose(est.statistic(x, x.mean(1), (1,), 50), x.std(1, unbiased=False))
    assert est.constant(50) == 1.0 and est.paper_constant(50) == 1.0


def test_l2_expected_raw_is_consistent_and_matches_monte_carlo(gaussian):
    assert math.isclose(consistent("l2", 64), 1.0, rel_tol=1e-12)
    x = gaussian(40000, 64)
    assert math.isclose(monte_carlo_raw("l2", x), get_estimator("l2").expected_raw(64), rel_tol=2e-3)


def test_l2_statistic_does_not_overflow():
    x = torch.tensor([[3e38, -3e38, 0.0, 1.0]], dtype=torch.float32)
    sigma = get_estimator("l2").statistic(x, x.mean(1), (1,), 4)
    assert torch.isfinite(sigma).all()
    assert math.isclose(sigma.item(), x.double().std(1, unbiased=False).item(), rel_tol=1e-6)


def test_l2_lean_stats_compiles_for_bfloat16_input():
    # Inductor CPU could not vectorize the float64 Welford reduction (torch.var_mean) fed by a bfloat16 → float32
    # → float64 conversion at this shape ("Welford reduction does not support VectorizedN"), which sent
    # impl="compiled" to eager; the two float64 passes compile, and equal the float64 statistic
    est = get_estimator("l2")

    def stats(x5):
        mean, raw, _ = est.lean_stats(x5.float())
        return mean, raw

    torch._dynamo.reset()
    x5 = (torch.randn(1, 1, 32, 64, 49) * 3 + 1).to(torch.bfloat16)
    mean, raw = torch.compile(stats, fullgraph=True)(x5)
    x64 = x5.double()
    ref_mean = x64.mean((0, 1, 2, 4), keepdim=True)
    ref_raw = (x64 - ref_mean).square().mean((0, 1, 2, 4), keepdim=True).sqrt()
    assert torch.allclose(mean.double(), ref_mean, rtol=1e-6, atol=1e-6)
    assert torch.allclose(raw.double(), ref_raw, rtol=1e-6)
