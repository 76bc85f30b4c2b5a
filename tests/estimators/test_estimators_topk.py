import math

import torch
from checks import consistent, monte_carlo_raw

from normmatters.estimators import get_estimator, paper_linf_constant
from normmatters.estimators.topk import NATIVE_MAX_K


def test_topk_is_constant_times_mean_of_k_largest(gaussian):
    x = gaussian(8, 30)
    est = get_estimator("topk")
    d = (x - x.mean(1, keepdim=True)).abs()
    top = d.sort(1, descending=True).values[:, :4]
    assert torch.allclose(est.statistic(x, x.mean(1), (1,), 30, k=4), est.constant(30, k=4) * top.mean(1))


def test_topk_options_and_native_limits():
    est = get_estimator("topk")
    assert est.options == frozenset({"k"})
    assert est.native_aux_rows == 1 and est.native_preferred and not est.native_inplace_rows
    x = torch.zeros(4, 3)
    assert est.native_covers(x, NATIVE_MAX_K, True)
    assert not est.native_covers(x, NATIVE_MAX_K + 1, True)
    assert not est.native_covers(x, 0, False)
    assert est.validate(8, k=9) is not None and est.validate(8, k=8) is None
    assert est.paper_constant(100) == paper_linf_constant(100)


def test_topk_expected_raw_is_consistent_and_matches_monte_carlo(gaussian):
    assert math.isclose(consistent("topk", 64, k=5), 1.0, rel_tol=1e-12)
    x = gaussian(40000, 64)
    assert math.isclose(monte_carlo_raw("topk", x, k=5), get_estimator("topk").expected_raw(64, k=5), rel_tol=5e-3)
