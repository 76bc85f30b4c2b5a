import copy

import pytest
import torch
from torch import nn

import normmatters as nm
from normmatters.nn import LpBatchNorm, LpBatchNorm1d, LpBatchNorm2d, LpBatchNorm3d


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.short(x))


def resnet18_like():
    """ResNet-18 layout (21 batch norms, 11M parameters) without torchvision."""
    layers = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
    cin = 64
    for cout, stride in [(64, 1), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1)]:
        layers.append(Block(cin, cout, stride))
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 10), nn.BatchNorm1d(10)]
    return nn.Sequential(*layers)


def _warm(model, x):
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(x)


@pytest.mark.parametrize("norm", ["l1", "linf", "topk", "range", "l2"])
def test_round_trip_on_resnet18(norm, device):
    torch.manual_seed(0)
    model = resnet18_like().to(device)
    x = torch.randn(8, 3, 16, 16, device=device)
    _warm(model, x)
    model.eval()
    with torch.no_grad():
        ref = model(x)
        ref64 = copy.deepcopy(model).cpu().double()(x.cpu().double())  # the CPU float64 reference
        n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        params = {id(p) for p in model.parameters()}
        conv = nm.convert_batchnorm(model, norm=norm)
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in conv.modules())
        assert sum(isinstance(m, LpBatchNorm) for m in conv.modules()) == n_bn == 21
        assert {id(p) for p in conv.parameters()} == params  # same Parameter objects: optimizers stay valid
        y1 = conv(x)
        back = nm.to_torch_batchnorm(conv)
        assert sum(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) for m in back.modules()) == 21
        y2 = back(x)
    assert y1.device == y2.device == x.device
    torch.testing.assert_close(y1, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(y2, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(y1.cpu().double(), ref64, atol=1e-4, rtol=1e-4)


def test_options_modes_types_dtypes_are_kept(device):
    model = nn.Sequential(nn.BatchNorm1d(3, eps=1e-3, momentum=0.3), nn.BatchNorm2d(4, affine=False),
                          nn.BatchNorm3d(5, track_running_stats=False).double()).to(device)
    model[0].eval()
    model[2].weight.requires_grad_(False)
    conv = nm.convert_batchnorm(model, norm="range", chunks=2)
    assert [type(m) for m in conv] == [LpBatchNorm1d, LpBatchNorm2d, LpBatchNorm3d]
    assert conv[0].eps == 1e-3 and conv[0].momentum == 0.3 and not conv[0].training and conv[1].training
    assert conv[1].weight is None and conv[1].chunks == 2
    assert conv[2].running_mean is None and conv[2].weight.dtype == torch.float64
    assert not conv[2].weight.requires_grad
    assert {t.device for t in (*conv.parameters(), *conv.buffers())} == {next(model.parameters()).device}
    back = nm.to_torch_batchnorm(conv)
    assert {t.device for t in (*back.parameters(), *back.buffers())} == {next(model.parameters()).device}
    assert [type(m) for m in back] == [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d]
    assert back[0].eps == 1e-3 and not back[0].training


def test_converting_a_bare_layer_returns_the_new_layer():
    bn = nn.BatchNorm2d(3)
    lp = nm.convert_batchnorm(bn, norm="linf")
    assert isinstance(lp, LpBatchNorm2d) and lp.norm == "linf" and lp.weight is bn.weight


def test_sync_batchnorm_stays_synced_and_back():
    group = object()  # stands in for a ProcessGroup: conversion only carries it over
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.SyncBatchNorm(4, process_group=group))
    weight = model[1].weight
    conv = nm.convert_batchnorm(model, norm="l1")
    assert type(conv[1]) is nm.SyncLpBatchNorm and conv[1].process_group is group and conv[1].weight is weight
    back = nm.to_torch_batchnorm(conv)[1]
    assert type(back) is nn.SyncBatchNorm and back.process_group is group


def test_rank_agnostic_lp_layer_becomes_sync_batchnorm():
    assert type(nm.to_torch_batchnorm(nn.Sequential(LpBatchNorm(4)))[0]) is nn.SyncBatchNorm


@pytest.mark.parametrize("bn, sync_cls", [(nn.BatchNorm1d(4), "SyncLpBatchNorm1d"),
                                          (nn.BatchNorm2d(4), "SyncLpBatchNorm2d"),
                                          (nn.BatchNorm3d(4), "SyncLpBatchNorm3d")])
def test_convert_with_sync_makes_synced_layers_of_the_same_rank(bn, sync_cls):
    model = nm.convert_batchnorm(nn.Sequential(bn), norm="topk", sync=True, k=3)
    assert type(model[0]) is getattr(nm, sync_cls) and model[0].norm == "topk" and model[0].k == 3
    assert model[0].process_group is None and model[0].weight is bn.weight


def test_convert_sync_lp_batchnorm_keeps_norm_options_and_state():
    group = object()
    lp = nm.L1BatchNorm2d(4, momentum=0.3, nonfinite="skip")
    lp(torch.randn(8, 4, 2, 2))
    model = nm.convert_sync_lp_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 1), lp), process_group=group)
    syn = model[1]
    assert type(syn) is nm.SyncLpBatchNorm2d and syn.process_group is group
    assert (syn.norm, syn.momentum, syn.nonfinite) == ("l1", 0.3, "skip")
    assert syn.running_mean is lp.running_mean and syn.weight is lp.weight
    assert nm.convert_sync_lp_batchnorm(syn) is syn  # already synced: left alone
    x = torch.randn(5, 4, 2, 2)  # no process group initialised: the same layer as before
    torch.testing.assert_close(syn.eval()(x), lp.eval()(x), rtol=0, atol=0)


def test_mean_only_to_torch_keeps_eval_output(device):
    m = nm.MeanOnlyBatchNorm2d(4, device=device)
    m(torch.randn(8, 4, 3, 3, device=device) + 2)
    m.eval()
    x = torch.randn(2, 4, 3, 3, device=device)
    ref = m(x)
    bn = nm.to_torch_batchnorm(copy.deepcopy(m)).eval()
    torch.testing.assert_close(bn(x), ref, atol=1e-6, rtol=1e-6)


def test_unknown_norm_fails_before_touching_the_model():
    model = nn.Sequential(nn.BatchNorm2d(3))
    with pytest.raises(ValueError, match="unknown norm"):
        nm.convert_batchnorm(model, norm="l3")
    assert type(model[0]) is nn.BatchNorm2d
