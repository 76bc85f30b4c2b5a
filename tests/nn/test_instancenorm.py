"""LpInstanceNorm1d/2d/3d: norm="l2" is nn.InstanceNorm*d (outputs, running statistics, state_dict, unbatched
input) in train and eval; other norms normalize each instance by their σ̂ and track its unbiased square."""

import pytest
import torch
from torch import nn

import normmatters as nm
from normmatters.estimators import get_estimator

CASES = [(nn.InstanceNorm1d, nm.LpInstanceNorm1d, (3, 4, 9)), (nn.InstanceNorm2d, nm.LpInstanceNorm2d, (3, 4, 5, 6)),
         (nn.InstanceNorm3d, nm.LpInstanceNorm3d, (2, 4, 3, 4, 5))]
KWARGS = [{}, {"affine": True}, {"affine": True, "track_running_stats": True},
          {"track_running_stats": True, "momentum": None}, {"affine": True, "bias": False}]


@pytest.mark.parametrize("ref_cls, cls, shape", CASES)
@pytest.mark.parametrize("kw", KWARGS)
def test_l2_is_the_stock_layer(ref_cls, cls, shape, kw):
    torch.manual_seed(0)
    ref, ours = ref_cls(4, **kw), cls(4, norm="l2", **kw)
    if ref.weight is not None:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    ours.load_state_dict(ref.state_dict())
    for _ in range(2):  # two training steps move the running statistics the same way
        x = torch.randn(shape) * 3 + 1
        torch.testing.assert_close(ours(x), ref(x))
    for name, buf in ref.named_buffers():
        torch.testing.assert_close(dict(ours.named_buffers())[name], buf)
    ref.eval(), ours.eval()
    x = torch.randn(shape)
    torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours(x[0]), ref(x[0]))  # unbatched input


@pytest.mark.parametrize("norm", ["l1", "linf", "range"])
def test_other_norms_normalize_each_instance_and_track_their_sigma(norm):
    torch.manual_seed(1)
    layer = nm.LpInstanceNorm2d(3, norm=norm, track_running_stats=True, momentum=1.0)
    x = torch.randn(4, 3, 6, 6) * torch.tensor([1.0, 5.0, 0.2]).reshape(1, 3, 1, 1)
    y = layer(x)
    torch.testing.assert_close(y, nm.lp_group_norm(x, 3, eps=layer.eps, norm=norm))
    est, flat = get_estimator(norm), x.reshape(4, 3, -1)
    mean = flat.mean(2)
    sigma = est.statistic(flat, mean if est.needs_mean else None, (2,), 36)
    torch.testing.assert_close(layer.running_mean, mean.mean(0))
    torch.testing.assert_close(layer.running_var, (sigma.square() * 36 / 35).mean(0))
    assert layer.num_batches_tracked.item() == 0  # as nn.InstanceNorm
    assert "norm='" + norm + "'" in repr(layer)


def test_bad_input_names_the_layer():
    with pytest.raises(ValueError, match="LpInstanceNorm2d: expected 3D"):
        nm.LpInstanceNorm2d(3, norm="l1")(torch.randn(2, 3))
    with pytest.raises(ValueError, match="LpInstanceNorm1d"):
        nm.LpInstanceNorm1d(3, norm="mean")
