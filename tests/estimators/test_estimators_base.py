import pytest
import torch

from normmatters.estimators import (
    ESTIMATORS,
    Estimator,
    available_norms,
    combine,
    get_estimator,
    mean_partial,
    norms_with_option,
    register_estimator,
)


def test_registry_order_and_lookup():
    assert available_norms() == ("l2", "l1", "linf", "topk", "range", "mean")
    assert all(get_estimator(n).name == n for n in available_norms())
    with pytest.raises(ValueError, match="unknown norm 'l3': expected one of 'l2', 'l1'"):
        get_estimator("l3")
    with pytest.raises(ValueError, match="unknown norm"):
        get_estimator(["l2"])


def test_register_needs_a_name_and_adds_under_it():
    with pytest.raises(ValueError, match="needs a name"):
        register_estimator(Estimator())
    est = register_estimator(Estimator(name="_test_only"))
    try:
        assert get_estimator("_test_only") is est
    finally:
        del ESTIMATORS["_test_only"]


def test_norm_specific_options_come_from_the_estimators():
    assert norms_with_option("chunks") == "'range'"
    assert norms_with_option("k") == "'topk'"
    assert norms_with_option("nothing") == ""


def test_base_methods_say_what_is_missing():
    est = Estimator(name="x")
    with pytest.raises(TypeError, match="norm='x' has no dispersion statistic"):
        est.expected_raw(8)
    with pytest.raises(ValueError, match="no emulation for norm='x'"):
        est.emulate_raw(None, None, 8, None, None)
    assert est.native_covers(torch.zeros(2, 3), 10, True)


@pytest.mark.parametrize("norm", ["l2", "l1", "linf", "topk", "range"])
def test_two_shards_combine_to_the_whole(norm):
    x = torch.randn(8, 3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    est = get_estimator(norm)
    dims, n = (0, 2), 8 * 5
    mp = combine([mean_partial(x[:4], dims), mean_partial(x[4:], dims)])
    mean = mp["sum"] / mp["count"]
    assert torch.allclose(mean, x.mean(dims))
    # range: each shard's range is one chunk's, so two shards combine to the chunks=2 statistic
    chunks = 2 if norm == "range" else None
    parts = [est.partial(x[:4], mean, dims, k=3), est.partial(x[4:], mean, dims, k=3)]
    whole = est.finalize(combine(parts, est.reductions, k=3), n, k=3, chunks=chunks)
    assert torch.allclose(whole, est.statistic(x, mean, dims, n, k=3, chunks=chunks))


def test_combine_rejects_an_unknown_reduction():
    with pytest.raises(ValueError, match="unknown reduction 'median'"):
        combine([{"a": torch.ones(2)}], {"a": "median"})
