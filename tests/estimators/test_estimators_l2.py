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
