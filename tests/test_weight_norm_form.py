"""to_weight_norm_form: the paper's weight-norm form (mean-only batch norm, frozen scale, (bounded) weight norm)."""

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

import normmatters as nm
from normmatters.weight_norm_form import to_weight_norm_form


def test_weight_norm_form_recipe():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 3))
    nm.to_weight_norm_form(model, p=math.inf)
    assert isinstance(model[1], nm.LpBatchNorm2d) and model[1].norm == "mean"
    assert not model[1].weight.requires_grad and model[1].bias.requires_grad
    assert parametrize.is_parametrized(model[0], "weight") and parametrize.is_parametrized(model[4], "weight")
    model(torch.randn(4, 3, 6, 6)).sum().backward()


def test_unbounded_form_uses_plain_weight_norm_and_keeps_nonbn_modules():
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2))
    out = to_weight_norm_form(model, bounded=False)
    assert out is model and isinstance(model[1], nm.LpBatchNorm1d) and model[1].norm == "mean"
    kinds = {type(model[0].parametrizations.weight[0]).__name__, type(model[3].parametrizations.weight[0]).__name__}
    bounded = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5))
    to_weight_norm_form(bounded, bounded=True)
    assert kinds != {type(bounded[0].parametrizations.weight[0]).__name__}
    assert isinstance(model[2], nn.ReLU)
