import math

import torch
from checks import consistent, monte_carlo_raw

from normmatters.estimators import get_estimator, paper_linf_constant


def test_linf_is_constant_times_max_abs_deviation(gaussian):
    x = gaussian(8, 30)
    est = get_estimator("linf")
    d = x - x.mean(1, keepdim=True)
    assert torch.allclose(est.statistic(x, x.mean(1), (1,), 30), est.constant(30) * d.abs().amax(1))


def test_linf_constants():
    est = get_estimator("linf")
    assert est.paper_constant(256) == paper_linf_constant(256)
    assert math.isclose(consistent("linf", 256), 1.0, rel_tol=1e-12)
    assert est.options == frozenset() and est.native_aux_rows == 0


def test_linf_expected_raw_matches_monte_carlo(gaussian):
    # the independence approximation is below 0.05 % off at n = 64; the Monte Carlo error ~0.1 %
    x = gaussian(40000, 64)
    assert math.isclose(monte_carlo_raw("linf", x), get_estimator("linf").expected_raw(64), rel_tol=5e-3)
