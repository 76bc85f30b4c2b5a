import math

import torch
from checks import consistent, monte_carlo_raw

from normmatters.estimators import get_estimator


def test_l1_is_constant_times_mean_abs_deviation(gaussian):
    x = gaussian(8, 30)
    est = get_estimator("l1")
    d = x - x.mean(1, keepdim=True)
    assert torch.allclose(est.statistic(x, x.mean(1), (1,), 30), est.constant(30) * d.abs().mean(1))


def test_l1_constants():
    est = get_estimator("l1")
    assert est.paper_constant(100) == math.sqrt(math.pi / 2)
    assert math.isclose(consistent("l1", 100), 1.0, rel_tol=1e-12)
    # finite-n constant tends to the asymptotic sqrt(pi/2) from below... within 1 % at n = 100
    assert math.isclose(est.constant(100), math.sqrt(math.pi / 2), rel_tol=1e-2)


def test_l1_expected_raw_matches_monte_carlo(gaussian):
    x = gaussian(40000, 32)
    assert math.isclose(monte_carlo_raw("l1", x), get_estimator("l1").expected_raw(32), rel_tol=3e-3)
