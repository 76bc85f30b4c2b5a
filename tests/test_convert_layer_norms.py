"""convert_norms / to_torch_norms: swap per-sample norms both ways, keeping parameters, dtype, device, mode."""

import copy

import pytest
import torch
from torch import nn

import normmatters as nm


def _model(dtype=torch.float32):
    return nn.Sequential(nn.Conv1d(16, 16, 3, padding=1, dtype=dtype), nn.GroupNorm(4, 16, dtype=dtype),
                         nn.Flatten(), nn.Linear(16 * 8, 32, dtype=dtype), nn.LayerNorm(32, dtype=dtype),
                         nn.Linear(32, 32, dtype=dtype), nn.RMSNorm(32, dtype=dtype),
                         nn.LayerNorm(32, bias=False, dtype=dtype))


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_l2_round_trip_keeps_outputs_parameters_and_mode(dtype, atol, device):
    torch.manual_seed(0)
    model = _model(dtype).to(device)
    for p in model.parameters():
        with torch.no_grad():
            p.add_(torch.rand_like(p) * 0.3)
    model.eval()
    model[4].train()  # a layer in another mode keeps it
    x = torch.randn(5, 16, 8, dtype=dtype, device=device)
    ref = model(x)
    params = {id(p) for p in model.parameters()}
    keys = set(model.state_dict())
    nm.convert_norms(model, norm="l2")
    assert isinstance(model[1], nm.LpGroupNorm) and isinstance(model[4], nm.LpLayerNorm)
    assert isinstance(model[6], nm.LpRMSNorm) and isinstance(model[7], nm.LpLayerNorm) and model[7].bias is None
    assert {id(p) for p in model.parameters()} == params and set(model.state_dict()) == keys
    assert model[4].training and not model[1].training
    assert {p.device for p in model.parameters()} == {x.device}
    torch.testing.assert_close(model(x), ref, atol=atol, rtol=0)
    nm.to_torch_norms(model)
    assert type(model[1]) is nn.GroupNorm and type(model[4]) is nn.LayerNorm and type(model[6]) is nn.RMSNorm
    assert {id(p) for p in model.parameters()} == params and model[4].training
    torch.testing.assert_close(model(x), ref, atol=atol, rtol=0)


def test_kinds_norm_and_dtype():
    model = _model(torch.float64)
    nm.convert_norms(model, norm="linf", kinds=("layer",))
    assert isinstance(model[4], nm.LpLayerNorm) and model[4].norm == "linf" and model[4].weight.dtype == torch.float64
    assert type(model[1]) is nn.GroupNorm and type(model[6]) is nn.RMSNorm
    assert nm.convert_norms(nn.GroupNorm(2, 8), norm="topk").norm == "topk"
    new = nm.convert_norms(nn.RMSNorm(8, eps=None, elementwise_affine=False), norm="l1")
    assert isinstance(new, nm.LpRMSNorm) and new.eps is None and new.weight is None


def test_bad_arguments():
    with pytest.raises(ValueError, match="convert_norms: unknown kinds \\['batch'\\]"):
        nm.convert_norms(_model(), kinds=("layer", "batch"))
    with pytest.raises(ValueError, match="convert_norms: unknown norm 'l7'"):
        nm.convert_norms(_model(), norm="l7")


@pytest.mark.parametrize("layer", [nn.LayerNorm(64), nn.RMSNorm(64), nn.GroupNorm(4, 64)])
def test_single_layer_float32_within_1e_6_both_ways(layer, device):
    torch.manual_seed(0)
    x = torch.randn(8, 64, 3, device=device) * 3 + 1
    x = x[..., 0] if not isinstance(layer, nn.GroupNorm) else x
    layer = copy.deepcopy(layer).to(device)  # the parametrized instance is shared across runs
    layer.eval()
    ref = layer(x)
    lp = nm.convert_norms(layer, norm="l2")
    torch.testing.assert_close(lp(x), ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(nm.to_torch_norms(lp)(x), ref, atol=1e-6, rtol=0)
