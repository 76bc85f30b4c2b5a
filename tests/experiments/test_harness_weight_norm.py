import math

import pytest
import torch
from torch.nn.utils import parametrize

from normmatters.experiments.config import ConfigError, TrainConfig
from normmatters.experiments.models import build_model
from normmatters.experiments.optim import param_groups
from normmatters.experiments.trainer import Trainer


def _cfg(**kw):
    return TrainConfig(**{**dict(model="resnet8", norm="bn", epochs=1, batch_size=64, threads=1, monitor=False), **kw})


@pytest.mark.parametrize("wn,p", [("wn", 2.0), ("bwn", 2.0), ("bwn", math.inf)])
def test_weight_norm_form_in_the_trainer(tiny, wn, p):
    t = Trainer(_cfg(weight_norm=wn, weight_norm_p=p, epochs=4, lr=0.05), None, data=tiny)
    m = t.module
    assert parametrize.is_parametrized(m.conv1, "weight") and m.bn1.norm == "mean"
    groups = param_groups(m)
    assert m.conv1.parametrizations.weight.original1 in groups["normalized"]  # the direction v
    assert m.conv1.parametrizations.weight.original0 in groups["other"]  # the magnitudes g
    res = t.fit()
    # it learns (data-dependent init keeps activations alive; without it the loss stayed at ln 10)
    assert res.epochs[-1]["train_loss"] < 0.8 * res.epochs[0]["train_loss"]


def test_class_sorted_batches_are_correlated(tiny):
    def classes_per_batch(order):
        t = Trainer(_cfg(batch_order=order), None, data=tiny)
        batches = t._epoch_batches(0)
        assert len(set(torch.cat(batches).tolist())) == sum(len(b) for b in batches)  # each sample once
        return max(len(set(t.data.train.labels[b].tolist())) for b in batches)

    # 64 class-sorted samples out of ~19 per class span at most 5 classes; shuffled batches span all 10
    assert classes_per_batch("class_sorted") <= 5 < 9 <= classes_per_batch("shuffle")


def test_lstm_model_and_errors():
    m = build_model("lstm", "none", in_channels=1, image_size=8, num_classes=10)
    assert m(torch.randn(5, 1, 8, 8)).shape == (5, 10)
    with pytest.raises(ValueError, match="lstm model has no normalization layers"):
        build_model("lstm", "bn", in_channels=1, image_size=8)
    with pytest.raises(ConfigError, match="weight_norm must be one of"):
        _cfg(weight_norm="bounded")
