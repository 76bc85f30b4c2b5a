"""Shared checks for the per-norm estimator test modules."""

import torch

from normmatters import constants
from normmatters.estimators import get_estimator


def consistent(norm: str, n: int, k: int = 10) -> float:
    """c(n) · E[raw]/σ divided by E[s_n]/σ: 1 when the constant makes the estimator consistent."""
    est = get_estimator(norm)
    return est.constant(n, k=k) * est.expected_raw(n, k=k) / constants.expected_biased_std(n)


def monte_carlo_raw(norm: str, x: torch.Tensor, k: int = 10) -> float:
    """Mean raw statistic (σ̂ / c) of the rows of x."""
    est = get_estimator(norm)
    n = x.shape[1]
    sigma = est.statistic(x, x.mean(1), (1,), n, k=k)
    return (sigma / est.constant(n, k=k)).mean().item()
