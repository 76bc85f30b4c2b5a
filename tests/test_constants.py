import math

import numpy as np
import pytest
import torch

from normmatters import constants
from normmatters.constants import (
    expected_biased_std,
    expected_mean_abs_deviation,
    expected_range,
    expected_top_k_mean,
)


def test_closed_forms_at_n2():
    # n = 2: s_2 = |x1 - x2|/2, range = |x1 - x2| ~ |N(0, 2)|, max(|x1|,|x2|) = (|x1+x2| + |x1-x2|)/2
    assert expected_biased_std(2) == pytest.approx(1 / math.sqrt(math.pi), rel=1e-12)
    assert expected_range(2) == pytest.approx(2 / math.sqrt(math.pi), rel=1e-10)
    assert expected_top_k_mean(2, 1) == pytest.approx(2 / math.sqrt(math.pi), rel=1e-10)


@pytest.mark.parametrize("n", [2, 3, 17, 1000, 10**6])
def test_top_n_mean_is_mean_abs(n):
    # the mean of all n half-normal draws has expectation sqrt(2/pi)
    assert expected_top_k_mean(n, n) == pytest.approx(math.sqrt(2 / math.pi), rel=1e-9)


def test_reference_values_from_background():
    assert expected_top_k_mean(65536, 1) == pytest.approx(4.4430, abs=1e-4)
    assert expected_range(64) == pytest.approx(4.6875, abs=1e-4)
    assert expected_range(65536) == pytest.approx(8.5823, abs=1e-4)
    assert expected_range(10) == pytest.approx(3.0775, abs=1e-4)  # classic d2 table value


def test_biased_std_and_mad_against_simulation():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200_000, 7, generator=g, dtype=torch.float64)
    s = x.std(1, unbiased=False).mean().item()
    mad = (x - x.mean(1, keepdim=True)).abs().mean().item()
    assert s == pytest.approx(expected_biased_std(7), abs=4 * 0.3 / math.sqrt(200_000))
    assert mad == pytest.approx(expected_mean_abs_deviation(7), abs=4 * 0.3 / math.sqrt(200_000))


@pytest.mark.parametrize("n,k", [(50, 1), (50, 5), (300, 10)])
def test_top_k_against_simulation(n, k):
    g = torch.Generator().manual_seed(2)
    rows = 100_000
    v = torch.randn(rows, n, generator=g, dtype=torch.float64).abs().topk(k, 1).values.mean(1)
    se = v.std().item() / math.sqrt(rows)
    assert v.mean().item() == pytest.approx(expected_top_k_mean(n, k), abs=4 * se)


@pytest.mark.parametrize("n,k", [(2, 1), (64, 1), (4096, 10), (10**6, 10), (10**8, 1), (10**8, 10), (5000, 500)])
def test_quadrature_converged(monkeypatch, n, k):
    # refine the Gauss-Legendre rule (24 -> 48 nodes per panel); the value must not move: accuracy << 1e-4
    base_top, base_range = expected_top_k_mean.__wrapped__(n, k), expected_range.__wrapped__(n)
    nodes, weights = np.polynomial.legendre.leggauss(48)
    monkeypatch.setattr(constants, "_NODES", nodes)
    monkeypatch.setattr(constants, "_WEIGHTS", weights)
    assert expected_top_k_mean.__wrapped__(n, k) == pytest.approx(base_top, rel=1e-9)
    assert expected_range.__wrapped__(n) == pytest.approx(base_range, rel=1e-9)


def test_large_n_asymptotics():
    # E[max of n normals] ~ sqrt(2 ln n) - (ln ln n + ln 4pi)/(2 sqrt(2 ln n)) + gamma/sqrt(2 ln n)
    n = 10**8
    a = math.sqrt(2 * math.log(n))
    approx = a - (math.log(math.log(n)) + math.log(4 * math.pi)) / (2 * a) + 0.5772156649 / a
    assert expected_range(n) / 2 == pytest.approx(approx, rel=5e-3)
    assert expected_biased_std(n) == pytest.approx(1 - 3 / (4 * n), rel=1e-7)


@pytest.mark.parametrize("bad", [1, 0, 2.5, "8"])
def test_bad_n(bad):
    with pytest.raises(ValueError, match="n must be an integer"):
        expected_range(bad)


def test_bad_k():
    with pytest.raises(ValueError, match="k must be an integer"):
        expected_top_k_mean(5, 6)
