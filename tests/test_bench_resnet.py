"""ResNet-20 for the benchmark (normmatters.bench_resnet): the architecture, its norm variants and the step
comparison's result shape."""

import pytest
import torch
from torch import nn

import normmatters as nm
from normmatters import bench
from normmatters import bench_resnet as R


def test_resnet20_layout():
    model = R.resnet20(nn.BatchNorm2d)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) == 19  # 1 + 3 stages × 3 blocks × 2: ResNet-20 counts these and the classifier
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 21  # + 2 projection shortcuts
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert R.resnet20(nn.BatchNorm2d, num_classes=7)(torch.randn(1, 3, 32, 32)).shape == (1, 7)


@pytest.mark.parametrize("name", ["bn", "l1", *R.WEIGHT_NORM_VARIANTS])
def test_variants(name):
    model = R._resnet20_variant(name, torch.device("cpu"))
    assert model.training
    lp = [m for m in model.modules() if isinstance(m, nm.LpBatchNorm)]
    if name == "bn":
        assert not lp and sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 21
    elif name == "l1":
        assert len(lp) == 21 and {m.norm for m in lp} == {"l1"}
    else:  # the paper's weight-norm form: mean-only batch norm and (bounded) weight norm on every weight
        assert len(lp) == 21 and {m.norm for m in lp} == {"mean"}
        assert all(not m.weight.requires_grad for m in lp)  # the scale is frozen: weight norm carries it
        assert any(isinstance(m, nm.nn.weightnorm.BoundedWeightNorm) for m in model.modules()) == \
            name.startswith("bwn")


def test_same_seed_same_model():
    a = R._resnet20_variant("range", torch.device("cpu"))
    b = R._resnet20_variant("range", torch.device("cpu"))
    for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(v, w), k


def test_bench_resnet20_reports_ratios_to_batchnorm():
    res = R.bench_resnet20(("l1",), torch.device("cpu"), rounds=1, batch=4, weight_norm=False)
    assert set(res) == {"bn_ms", "step", "saved"} and res["bn_ms"] > 0
    assert set(res["step"]) == set(res["saved"]) == {"l1"}
    assert res["step"]["l1"] > 0 and 0.5 < res["saved"]["l1"] < 2
    assert bench.bench_resnet20 is R.bench_resnet20 and bench.resnet20 is R.resnet20
