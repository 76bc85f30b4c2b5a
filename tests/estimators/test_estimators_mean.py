import pytest

from normmatters.estimators import available_norms, get_estimator


def test_mean_only_has_no_statistic():
    est = get_estimator("mean")
    assert not est.divides and est.constant(10) == 1.0 and est.partial(None, None, (0,)) == {}
    with pytest.raises(TypeError, match="norm='mean' has no dispersion statistic"):
        est.finalize({}, 10)
    with pytest.raises(TypeError, match="no dispersion statistic"):
        est.expected_raw(10)
    with pytest.raises(TypeError, match="no published constant"):
        est.paper_constant(10)


def test_mean_is_the_only_norm_that_does_not_divide():
    assert [n for n in available_norms() if not get_estimator(n).divides] == ["mean"]
