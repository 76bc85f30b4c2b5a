import pytest
import torch
from torch import nn

import normmatters as nm
from normmatters.optim import gradient_scale_invariant, scale_invariant_parameters


def test_finds_weights_before_normalization_only():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3), nm.LpBatchNorm2d(8, norm="l1"), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 4 * 4, 5), nn.Linear(5, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    found = scale_invariant_parameters(model, torch.randn(16, 3, 8, 8))
    assert [n for n, _ in found] == ["0.weight", "3.weight"]
    assert found[0][1] is model[0].weight  # the model's own parameter
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # running stats untouched


def test_model_without_normalization_has_none():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    assert scale_invariant_parameters(model, torch.randn(8, 4)) == []


def test_mean_only_norm_is_not_scale_invariant_but_range_norm_is():
    x = torch.randn(16, 4)
    mean_only = nn.Sequential(nn.Linear(4, 6), nm.MeanOnlyBatchNorm1d(6))
    assert scale_invariant_parameters(mean_only, x) == []
    ranged = nn.Sequential(nn.Linear(4, 6), nm.RangeBatchNorm1d(6))
    assert [n for n, _ in scale_invariant_parameters(ranged, x)] == ["0.weight"]


def test_gradient_test_agrees_with_the_probe():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 3))
    x = torch.randn(8, 3, 6, 6)
    probe = [n for n, _ in scale_invariant_parameters(model, x)]
    nn.functional.cross_entropy(model(x), torch.randint(0, 3, (8,))).backward()
    params = [p for _, p in model.named_parameters()]
    flags = gradient_scale_invariant(params)
    assert [n for (n, _), f in zip(model.named_parameters(), flags) if f] == probe == ["0.weight"]
    # at other weights than the gradient's, the conv weight's orthogonality is gone
    moved = [p.detach() + torch.randn_like(p) for p in params]
    assert not gradient_scale_invariant(params, weights=moved)[0]
    with pytest.raises(ValueError, match="2 weights for 5 parameters"):
        gradient_scale_invariant(params, weights=moved[:2])
