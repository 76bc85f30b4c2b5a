"""resolve_impl: the impl switch and $NORMMATTERS_KERNEL (the one place that reads it)."""

import pytest

from normmatters.kernels.impl import ENV, IMPLS, resolve_impl


def test_explicit_impl_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv(ENV, "eager")
    assert resolve_impl("native") == "native"
    assert resolve_impl(None) == "eager"


@pytest.mark.parametrize("value", [None, ""])
def test_default_is_auto(monkeypatch, value):
    if value is None:
        monkeypatch.delenv(ENV, raising=False)
    else:
        monkeypatch.setenv(ENV, value)
    assert resolve_impl(None) == "auto"


def test_bad_values_name_the_caller_and_the_source(monkeypatch):
    with pytest.raises(ValueError, match=r"LpBatchNorm2d: impl must be one of .*'reference'\), got 'cuda'"):
        resolve_impl("cuda", "LpBatchNorm2d")
    monkeypatch.setenv(ENV, "fast")
    with pytest.raises(ValueError, match=r"lean_batch_norm: \$NORMMATTERS_KERNEL must be one of"):
        resolve_impl(None)
    assert set(IMPLS) == {"auto", "native", "compiled", "eager", "triton", "reference"}
