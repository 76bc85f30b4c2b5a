"""The uncentered constants (RMS norm): E[c_unc(n) · raw(x)] = E[RMS_n] for zero-mean Gaussian x, by Monte Carlo."""

import math

import pytest
import torch

from normmatters import constants
from normmatters.estimators import get_estimator


def test_expected_rms_closed_forms():
    # n = 2: E[sqrt((z1² + z2²)/2)] = sqrt(π/4) (a Rayleigh mean over sqrt 2); large n → 1 − 1/(4n)
    assert math.isclose(constants.expected_rms(2), math.sqrt(math.pi) / 2, rel_tol=1e-12)
    assert math.isclose(constants.expected_rms(10**6), 1 - 1 / (4 * 10**6), rel_tol=1e-11)
    with pytest.raises(ValueError):
        constants.expected_rms(1)


def test_l1_uncentered_is_exact():
    est = get_estimator("l1")
    assert est.constant(100, centered=False) == constants.expected_rms(100) / math.sqrt(2 / math.pi)
    assert est.constant(100, centered=False) != est.constant(100)


def test_l2_uncentered_is_rms(gaussian):
    x = gaussian(5, 33) + 3.0
    sigma = get_estimator("l2").statistic_uncentered(x, (1,), 33)
    assert torch.allclose(sigma, x.square().mean(1).sqrt(), rtol=1e-14)


@pytest.mark.parametrize("norm,n", [("l1", 16), ("l1", 256), ("linf", 16), ("linf", 256), ("topk", 64),
                                    ("range", 16), ("range", 256)])
def test_uncentered_consistent_monte_carlo(gaussian, norm, n):
    x = gaussian(40000, n, seed=n)
    est = get_estimator(norm)
    sigma = est.statistic_uncentered(x, (1,), n)
    ratio = sigma.mean().item() / constants.expected_rms(n)
    assert math.isclose(ratio, 1.0, rel_tol=3e-3), ratio


def test_uncentered_default_is_centered():
    for norm in ("l1", "linf", "topk", "range"):
        est = get_estimator(norm)
        assert est.constant(64) == est.constant(64, centered=True)
