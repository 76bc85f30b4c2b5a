import pickle

import pytest
from torch import nn

import normmatters as nm


def test_names_build_layers():
    assert isinstance(nm.norm_layer("l1")(8), nm.LpBatchNorm2d)
    layer = nm.norm_layer("topk", k=3, dim=1)(8)
    assert isinstance(layer, nm.LpBatchNorm1d) and layer.k == 3 and layer.norm == "topk"
    assert type(nm.norm_layer("bn")(8)) is nn.BatchNorm2d
    assert type(nm.norm_layer("BatchNorm", dim=3)(8)) is nn.BatchNorm3d
    assert isinstance(nm.norm_layer("none")(8), nn.Identity)
    assert nm.norm_layer("range", chunks=2)(4).chunks == 2


def test_callable_passthrough_and_pickle():
    f = nm.norm_layer(nn.GroupNorm, num_groups=2)
    assert isinstance(f(num_channels=4), nn.GroupNorm)
    g = pickle.loads(pickle.dumps(nm.norm_layer("linf")))
    assert g(4).norm == "linf"


def test_errors():
    with pytest.raises(ValueError, match="unknown norm 'l9'"):
        nm.norm_layer("l9")
    with pytest.raises(ValueError, match="dim must be 1, 2 or 3"):
        nm.norm_layer("l1", dim=4)
    with pytest.raises(TypeError, match="norm must be a name or a callable"):
        nm.norm_layer(3)
