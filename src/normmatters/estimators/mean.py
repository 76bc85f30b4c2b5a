"""``mean``: mean-only batch norm (y = weight·d + bias), no dispersion statistic."""

from __future__ import annotations

from .base import Estimator


class _MeanOnly(Estimator):
    def constant(self, n, k=10, chunks=None, centered=True):
        return 1.0

    def partial(self, x, mean, dims, k=10, chunks=None):
        return {}

    def finalize(self, part, n, k=10, chunks=None):
        raise TypeError("norm='mean' has no dispersion statistic (mean-only batch norm)")


ESTIMATOR = _MeanOnly(name="mean", divides=False)
