import math

import pytest
import torch
from checks import consistent, monte_carlo_raw

from normmatters.estimators import get_estimator, paper_range_constant


def test_range_chunks_average_the_chunk_ranges(gaussian):
    x = gaussian(5, 12).T.contiguous()  # (batch 12, 5 channels), reduced over the batch
    est = get_estimator("range")
    got = est.statistic(x, None, (0,), 12, chunks=3)
    xc = x.reshape(3, 4, 5)
    want = (xc.amax(1) - xc.amin(1)).mean(0) * est.constant(12, chunks=3)
    assert torch.allclose(got, want)
    with pytest.raises(ValueError, match="chunks=5 must divide the batch dimension, got 12"):
        est.partial(x, None, (0,), chunks=5)


def test_range_options_and_native_limits():
    est = get_estimator("range")
    assert est.options == frozenset({"chunks"}) and not est.needs_mean and est.native_aux_rows == 2
    huge = torch.empty(2**30, 1, 2, device="meta")  # 2**31 elements per channel: int32 positions overflow
    assert not est.native_covers(huge, 10, channel_layout=True)
    assert est.native_covers(huge, 10, channel_layout=False)
    assert est.validate(4, chunks=2) is None and "at least 2 elements per chunk" in est.validate(4, chunks=3)
    assert est.paper_constant(64) == paper_range_constant(64)


def test_range_expected_raw_is_consistent_and_matches_monte_carlo(gaussian):
    assert math.isclose(consistent("range", 64), 1.0, rel_tol=1e-12)
    x = gaussian(40000, 64)
    assert math.isclose(monte_carlo_raw("range", x), get_estimator("range").expected_raw(64), rel_tol=3e-3)
