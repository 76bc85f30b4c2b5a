import pytest
import torch

from normmatters.estimators.extremes import _extreme_pieces, _extreme_sums


@pytest.mark.parametrize("values", [[1.0, -3.0, 2.0, 3.0, -0.5], [0.5, -2.0, 1.0, 0.25, 0.0]])
def test_k1_backward_is_autograds_amax_rule_with_ties(values):
    d = torch.tensor(values, dtype=torch.float64).reshape(1, 1, 5, 1, 1)  # layout (G, m, q, C, S)
    leaf = d.clone().requires_grad_(True)
    leaf.abs().amax((1, 2, 4), keepdim=True).sum().backward()
    tau = d.abs().amax((1, 2, 4), keepdim=True)
    e, e_sum = _extreme_pieces(d, tau, _extreme_sums(d, tau), 1)
    assert torch.allclose(e, leaf.grad)
    assert torch.allclose(e_sum, leaf.grad.sum((1, 2, 4), keepdim=True))


def test_topk_backward_is_the_mean_of_the_k_largest():
    d = torch.tensor([4.0, -3.0, 2.0, 1.0, -0.5], dtype=torch.float64).reshape(1, 1, 5, 1, 1)
    leaf = d.clone().requires_grad_(True)
    leaf.abs().flatten().topk(2).values.mean().backward()
    tau = torch.tensor(3.0, dtype=torch.float64).reshape(1, 1, 1, 1, 1)
    e, _ = _extreme_pieces(d, tau, _extreme_sums(d, tau), 2)
    assert torch.allclose(e, leaf.grad)
