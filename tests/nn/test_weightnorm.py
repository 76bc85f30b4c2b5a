import copy
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import normmatters as nm
from normmatters.nn.weightnorm import BoundedWeightNorm, WeightNorm

PS = [1, 2, math.inf]


def slice_norms(w, p, dim=0):
    return w.detach().transpose(0, dim).flatten(1).norm(p=p, dim=1)


def _train(module, steps=40, lr=5.0, shape=(16, 4, 9, 9)):
    opt = torch.optim.SGD(module.parameters(), lr=lr)
    device = next(module.parameters()).device
    for _ in range(steps):
        opt.zero_grad()
        module(torch.randn(*shape).to(device)).pow(2).mean().backward()
        opt.step()


@pytest.mark.parametrize("p", PS)
@pytest.mark.parametrize("learn_scale", [True, False])
def test_weight_unchanged_at_registration_and_bound_holds(p, learn_scale, device):
    conv = nn.Conv2d(4, 8, 3, device=device)
    w0 = conv.weight.detach().clone()
    nm.bounded_weight_norm(conv, p=p, learn_scale=learn_scale)
    torch.testing.assert_close(conv.weight, w0, atol=1e-6, rtol=1e-6)
    rho = slice_norms(w0, p).norm()
    assert conv.parametrizations.weight[0].rho.item() == pytest.approx(rho.item(), rel=1e-6)
    _train(conv)
    assert not torch.allclose(conv.weight, w0, atol=1e-3)  # it did learn
    assert slice_norms(conv.weight, p).norm().item() == pytest.approx(rho.item(), rel=1e-5)
    if not learn_scale:  # every slice keeps its own initial norm
        torch.testing.assert_close(slice_norms(conv.weight, p), slice_norms(w0, p), rtol=1e-5, atol=0)


def test_plain_weight_norm_is_not_bounded():
    conv = nn.Conv2d(4, 8, 3)
    w0 = conv.weight.detach().clone()
    nm.weight_norm(conv)
    torch.testing.assert_close(conv.weight, w0, atol=1e-6, rtol=1e-6)
    _train(conv)
    assert abs(slice_norms(conv.weight, 2).norm() / slice_norms(w0, 2).norm() - 1) > 0.05


def test_explicit_rho():
    lin = nn.Linear(5, 3)
    nm.bounded_weight_norm(lin, rho=2.5)
    assert slice_norms(lin.weight, 2).norm().item() == pytest.approx(2.5, rel=1e-6)


@pytest.mark.parametrize("cls", [BoundedWeightNorm, WeightNorm])
@pytest.mark.parametrize("p", PS)
def test_gradcheck_float64(cls, p, device):
    v = torch.randn(4, 3, 2, dtype=torch.float64, device=device, requires_grad=True)
    g = (torch.rand(4, 1, 1, dtype=torch.float64, device=device) + 0.5).requires_grad_()
    extra = (torch.tensor(3.0, dtype=torch.float64),) if cls is BoundedWeightNorm else ()
    param = cls(0, float(p), True, None, *extra).to(device)
    assert torch.autograd.gradcheck(lambda g, v: param(g, v), (g, v))


def test_removal_state_dict_deepcopy():
    lin = nn.Linear(5, 3)
    nm.bounded_weight_norm(lin, p=math.inf)
    with torch.no_grad():
        for prm in lin.parameters():
            prm.add_(0.1)
    other = nn.Linear(5, 3)
    nm.bounded_weight_norm(other, p=math.inf)
    other.load_state_dict(lin.state_dict())
    torch.testing.assert_close(other.weight, lin.weight)
    torch.testing.assert_close(copy.deepcopy(lin).weight, lin.weight)
    w = lin.weight.detach().clone()
    parametrize.remove_parametrizations(lin, "weight")
    assert not parametrize.is_parametrized(lin) and isinstance(lin.weight, nn.Parameter)
    torch.testing.assert_close(lin.weight, w)


def test_compile_fullgraph(device):
    # compiled on the test device against the same layer run eagerly on the CPU in float64
    torch._dynamo.reset()
    conv = nn.Conv2d(3, 4, 3)
    nm.bounded_weight_norm(conv)
    ref = copy.deepcopy(conv).double()
    conv.to(device)
    f = torch.compile(conv, fullgraph=True)
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(f(x.to(device)).cpu().double(), ref(x.double()), atol=1e-5, rtol=1e-5)
    x = x.to(device)
    f(x).sum().backward()
    assert conv.parametrizations.weight.original1.grad is not None


@pytest.mark.parametrize("rnn", [nn.LSTM(6, 10, num_layers=2), nn.GRU(6, 10, bidirectional=True)])
def test_recurrent_weights_per_gate_row(rnn):
    done = nm.apply_bounded_weight_norm(rnn)
    names = [n for n, _ in nn.Module.named_parameters(rnn) if "weight" in n]
    assert done and all(parametrize.is_parametrized(rnn, n) for n in done)
    assert all(n.startswith("parametrizations.weight_") for n in names)
    y, _ = rnn(torch.randn(7, 3, 6))
    y.sum().backward()
    assert torch.isfinite(y).all()
    g = rnn.parametrizations.weight_hh_l0.original0
    assert g.grad is not None and g.shape == (rnn.weight_hh_l0.shape[0], 1)  # one magnitude per gate row
    with torch.no_grad():  # the recurrent layer really uses the parametrized weight
        g.mul_(torch.rand_like(g))
    y2, _ = rnn(torch.randn(7, 3, 6))
    assert not torch.allclose(y2, y)


def test_apply_filters_and_types():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ConvTranspose2d(4, 6, 2), nn.Flatten(),
                          nn.Linear(6 * 5 * 5, 2))
    w_t = model[2].weight.detach().clone()
    done = nm.apply_bounded_weight_norm(model, exclude="4.*")
    assert done == ["0.weight", "2.weight"]
    assert model[2].parametrizations.weight[0].dim == 1  # transposed conv: output channels are dim 1
    torch.testing.assert_close(model[2].weight, w_t, atol=1e-6, rtol=1e-6)
    assert nm.apply_weight_norm(model, include=lambda n: n.startswith("4")) == ["4.weight"]
    assert nm.apply_bounded_weight_norm(model) == []  # everything already parametrized


def test_errors():
    with pytest.raises(ValueError, match="bounded_weight_norm: p must be 1, 2 or inf, got 3.5"):
        nm.bounded_weight_norm(nn.Linear(5, 3), p=3.5)
    with pytest.raises(ValueError, match="p must be 1, 2 or inf, got 'two'"):
        nm.weight_norm(nn.Linear(5, 3), p="two")
    with pytest.raises(ValueError, match=r"dim must be an int in \[-2, 1\] for Linear.weight of shape \(3, 5\), got 2"):
        nm.bounded_weight_norm(nn.Linear(5, 3), dim=2)
    with pytest.raises(ValueError, match="Linear has no tensor named 'kernel'"):
        nm.bounded_weight_norm(nn.Linear(5, 3), "kernel")
    lin = nn.Linear(5, 3)
    nm.bounded_weight_norm(lin)
    with pytest.raises(ValueError, match="already parametrized"):
        nm.bounded_weight_norm(lin)
    with pytest.raises(ValueError, match="rho is an option of bounded_weight_norm"):
        nm.weight_norm(nn.Linear(5, 3), rho=1.0)
    zero = nn.Linear(5, 3)
    with torch.no_grad():
        zero.weight[1].zero_()
    with pytest.raises(ValueError, match="all-zero slice"):
        nm.bounded_weight_norm(zero)
    with pytest.raises(ValueError, match="rho must be a positive finite number"):
        nm.bounded_weight_norm(nn.Linear(5, 3), rho=-1.0)


def test_data_dependent_init_gives_unit_std_channels_and_keeps_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4))
    x = torch.randn(32, 3, 9, 9)
    before = {k: v.clone() for k, v in model.named_buffers()}
    nm.to_weight_norm_form(model, example_input=x)
    after = dict(model.named_buffers())
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # running statistics untouched
    model.train()
    outs = []
    hook = model[3].register_forward_hook(lambda m, i, o: outs.append(o))
    model(x)
    hook.remove()
    std = outs[0].transpose(0, 1).flatten(1).std(dim=1)
    torch.testing.assert_close(std, torch.ones(4), atol=1e-4, rtol=1e-4)
