from __future__ import annotations

import pytest
import torch
from torch import nn

from normmatters import LpBatchNorm1d, LpBatchNorm2d, norm_layer
from normmatters.experiments.models import CifarResNet, build_model


@pytest.mark.parametrize("name,depth_convs", [("resnet20", 19), ("resnet32", 31), ("resnet56", 55)])
def test_resnet_depths(name, depth_convs):
    m = build_model(name, "l1", in_channels=3, image_size=32, num_classes=100)
    convs = [c for c in m.modules() if isinstance(c, nn.Conv2d) and c.kernel_size == (3, 3)]
    assert len(convs) == depth_convs  # + the classifier = depth 6n+2
    assert all(bn.norm == "l1" for bn in m.modules() if isinstance(bn, LpBatchNorm2d))
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 100)


@pytest.mark.parametrize("name", ["resnet8", "vgg11", "vgg16", "mlp"])
@pytest.mark.parametrize("norm", ["bn", "linf", "none"])
def test_models_adapt_to_input(name, norm):
    m = build_model(name, norm, in_channels=1, image_size=8, num_classes=7)
    assert m(torch.randn(4, 1, 8, 8)).shape == (4, 7)
    lp = [x for x in m.modules() if isinstance(x, LpBatchNorm1d | LpBatchNorm2d)]
    torch_bn = [x for x in m.modules() if isinstance(x, nn.BatchNorm1d | nn.BatchNorm2d)]
    if norm == "bn":
        assert torch_bn and not lp
    elif norm == "linf":
        assert lp and not torch_bn and all(x.norm == "linf" for x in lp)
    else:
        assert not lp and not torch_bn


def test_callable_norm_and_options():
    calls = []

    def my_norm(c: int) -> nn.Module:
        calls.append(c)
        return nn.GroupNorm(1, c)

    m = CifarResNet(20, my_norm, num_classes=10, in_channels=3)
    assert calls[0] == 16 and 64 in calls and len(calls) == 19 + 2  # 2 projection shortcuts
    m = build_model("resnet8", "topk", in_channels=3, k=3)
    assert {x.k for x in m.modules() if isinstance(x, LpBatchNorm2d)} == {3}
    m = build_model("vgg11", norm_layer("range", chunks=2), in_channels=3, image_size=16)
    assert {x.chunks for x in m.modules() if isinstance(x, LpBatchNorm2d)} == {2}


def test_bad_model_names():
    with pytest.raises(ValueError, match="depth must be 6n\\+2"):
        build_model("resnet21")
    with pytest.raises(ValueError, match="unknown model 'alexnet'"):
        build_model("alexnet")
