"""lp_layer_norm / lp_rms_norm / lp_group_norm against the F.* reference (norm="l2") and the registry."""

import pytest
import torch
import torch.nn.functional as F

import normmatters as nm
from normmatters.estimators import get_estimator


def test_l2_equals_torch_functionals():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 8, dtype=torch.float64) * 4 - 1
    w, b = torch.rand(4, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    torch.testing.assert_close(nm.lp_layer_norm(x, (4, 8), w, b, norm="l2"), F.layer_norm(x, (4, 8), w, b))
    torch.testing.assert_close(nm.lp_rms_norm(x, (4, 8), w, norm="l2"), F.rms_norm(x, (4, 8), w))
    wc, bc = torch.rand(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    torch.testing.assert_close(nm.lp_group_norm(x, 3, wc, bc, norm="l2"), F.group_norm(x, 3, wc, bc))


@pytest.mark.parametrize("norm", ["l1", "linf", "range"])
def test_statistic_is_the_registry_one(norm):
    torch.manual_seed(0)
    x = torch.randn(5, 40, dtype=torch.float64)
    est = get_estimator(norm)
    sigma = est.statistic(x, x.mean(1), (1,), 40)
    expected = (x - x.mean(1, keepdim=True)) / torch.sqrt(sigma[:, None] ** 2 + 1e-5)
    torch.testing.assert_close(nm.lp_layer_norm(x, 40, norm=norm), expected)
    unc = est.statistic_uncentered(x, (1,), 40)
    torch.testing.assert_close(nm.lp_rms_norm(x, 40, eps=1e-6, norm=norm), x / torch.sqrt(unc[:, None] ** 2 + 1e-6))


def test_half_input_computed_in_float32():
    x = torch.randn(4, 64).half()
    y = nm.lp_layer_norm(x, 64, norm="l1")
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.float(), nm.lp_layer_norm(x.float(), 64, norm="l1"), atol=1e-3, rtol=1e-3)
    assert nm.lp_rms_norm(x, 64).dtype == torch.float16
