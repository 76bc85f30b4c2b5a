import pytest
import torch
from torch import nn

from normmatters.integrations.hooks import LazyMimic, candidates, mimic_factors, raw_optimizer, select_metrics


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6, bias=False), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))


def test_candidates_and_raw_optimizer():
    net = _net()
    opt = torch.optim.SGD(list(net[0].parameters()) + list(net[3].parameters()), lr=0.1)
    assert [n for n, _ in candidates(net, opt)] == ["0.weight", "3.weight"]  # ≥ 2 dims, in the optimizer
    assert [n for n, _ in candidates(net, opt, ["3.bias"])] == ["3.bias"]
    with pytest.raises(ValueError, match=r"\['1.weight'\] are not trainable parameters of Sequential"):
        candidates(net, opt, ["1.weight"])

    class Wrapper:  # as Lightning's and accelerate's wrappers hold the torch optimizer
        optimizer = opt

    assert raw_optimizer(Wrapper()) is opt and raw_optimizer(opt) is opt
    with pytest.raises(TypeError, match="found no torch.optim.Optimizer"):
        raw_optimizer(object())


def test_select_metrics():
    row = {"step": 3, "effective_lr/a": 1, "norm/a": 2.0, "angular_update/a": 0.5, "channel_norm/a": [1.0]}
    assert select_metrics(row, ("effective_lr", "angular_update")) == {"effective_lr/a": 1.0,
                                                                       "angular_update/a": 0.5}


def test_lazy_mimic_finds_the_scale_invariant_weights_at_the_first_step():
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    lazy = LazyMimic(opt, candidates(net, opt), rule=None, weight_decay=None)
    assert lazy.mimic is None and lazy.rule == "rescale"
    nn.functional.cross_entropy(net(torch.randn(16, 5)), torch.randint(0, 3, (16,))).backward()
    opt.step()
    assert lazy.names == ["0.weight"] and lazy.mimic.weight_decay == 0.01 and lazy.mimic.steps == 1
    facs = mimic_factors([("0.weight", net[0].weight), ("3.weight", net[3].weight)], lazy.mimic)
    assert facs[0] is lazy.mimic.last_factors[0] and torch.equal(facs[1], torch.ones(3, dtype=torch.float64))
    state = lazy.state_dict()
    lazy.remove()
    opt.step()
    assert lazy.mimic.steps == 1 and state["names"] == ["0.weight"]

    plain = nn.Sequential(nn.Linear(5, 3))
    opt = torch.optim.SGD(plain.parameters(), lr=0.1, weight_decay=0.01)
    LazyMimic(opt, candidates(plain, opt), rule=None, weight_decay=None)
    nn.functional.cross_entropy(plain(torch.randn(4, 5)), torch.randint(0, 3, (4,))).backward()
    with pytest.raises(ValueError, match="found no scale-invariant weight"):
        opt.step()
