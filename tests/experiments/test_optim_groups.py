from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from normmatters.experiments.config import TrainConfig
from normmatters.experiments.models import build_model
from normmatters.experiments.optim import build_optimizer, lr_multiplier, param_groups


def test_param_groups_resnet():
    m = build_model("resnet8", "l1", in_channels=1, image_size=8)
    g = param_groups(m)
    convs = [c.weight for c in m.modules() if isinstance(c, nn.Conv2d)]
    assert {id(p) for p in g["normalized"]} == {id(p) for p in convs}  # every conv feeds a norm
    assert {id(p) for p in g["other"]} == {id(m.fc.weight), id(m.fc.bias)}
    assert len(g["norm"]) == 2 * sum(1 for x in m.modules() if hasattr(x, "running_mean"))
    assert sum(len(v) for v in g.values()) == len(list(m.parameters()))


def test_param_groups_without_norm():
    m = build_model("mlp", "none", in_channels=1, image_size=8)
    g = param_groups(m)
    assert not g["normalized"] and not g["norm"] and len(g["other"]) == len(list(m.parameters()))


@pytest.mark.parametrize(
    "opt,cls", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)]
)
def test_build_optimizer_decay_values(opt, cls):
    m = build_model("resnet8", "bn", in_channels=1, image_size=8)
    cfg = TrainConfig(optimizer=opt, weight_decay=1e-4, wd_normalized=3e-4, wd_norm=0.0, nesterov=True)
    o = build_optimizer(m, cfg)
    assert isinstance(o, cls)
    assert {g["name"]: g["weight_decay"] for g in o.param_groups} == {
        "normalized": 3e-4,
        "norm": 0.0,
        "other": 1e-4,
    }
    if opt == "sgd":
        assert o.param_groups[0]["nesterov"] and o.param_groups[0]["momentum"] == 0.9


def test_schedules():
    f = lr_multiplier(TrainConfig(schedule="step", step_size=2, gamma=0.5, epochs=6), steps_per_epoch=10)
    assert [f(s) for s in (0, 19, 20, 45)] == [1.0, 1.0, 0.5, 0.25]
    f = lr_multiplier(TrainConfig(schedule="multistep", milestones=[1, 3], gamma=0.1, epochs=6), 10)
    assert f(9) == 1.0 and math.isclose(f(10), 0.1) and math.isclose(f(35), 0.01)
    f = lr_multiplier(TrainConfig(schedule="cosine", epochs=4, warmup_epochs=1, warmup_start=0.2), 10)
    assert math.isclose(f(0), 0.2) and math.isclose(f(5), 0.6) and f(10) == 1.0
    assert math.isclose(f(25), 0.5) and math.isclose(f(40), 0.0, abs_tol=1e-12)
    f = lr_multiplier(TrainConfig(schedule="constant", epochs=2), 10)
    assert f(0) == f(19) == 1.0
