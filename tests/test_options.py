"""NormOptions (normmatters.options): one frozen, validated object for every option, carried by the layers and
the functional paths."""

import copy
import dataclasses
import pickle

import pytest
import torch

import normmatters as nm
from normmatters.kernels import lean_batch_norm
from normmatters.options import OPTION_NAMES, NormOptions, check_option
from normmatters.precision.layer import emulated_lp_batch_norm


def test_fields_and_defaults_are_the_layers():
    assert OPTION_NAMES == ("norm", "k", "chunks", "ghost_batch_size", "eps", "momentum", "nonfinite", "impl",
                            "inplace", "precision")
    layer = nm.LpBatchNorm2d(4)
    assert layer.options == NormOptions()
    assert nm.NormOptions is NormOptions


def test_frozen_and_replace_validates():
    opts = NormOptions(norm="range", chunks=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.k = 3
    assert opts.replace(momentum=None).momentum is None
    with pytest.raises(ValueError, match="NormOptions: chunks is an option of norm='range' only"):
        opts.replace(norm="l1")


@pytest.mark.parametrize("field, value, message", [
    ("norm", "l7", "NormOptions: unknown norm"),
    ("k", 0, "k must be a positive int, got 0"),
    ("k", True, "k must be a positive int"),
    ("chunks", 2, "chunks is an option of norm='range' only, got norm='l1'"),
    ("ghost_batch_size", -1, "ghost_batch_size must be a positive int or None"),
    ("eps", float("nan"), "eps must be a real number"),
    ("momentum", 1.5, r"momentum must be in \[0, 1\] or None, got 1.5"),
    ("momentum", torch.zeros(2), "1-element tensor"),
    ("nonfinite", "warn", "nonfinite must be one of"),
    ("impl", "cuda", "impl must be one of"),
    ("inplace", 1, "inplace must be a bool"),
    ("precision", 16, "precision must be None, a Precision or a preset name"),
])
def test_every_rule_raises_naming_the_caller(field, value, message):
    with pytest.raises(ValueError, match=message):
        NormOptions(**{field: value})


def test_inplace_and_precision_exclude_each_other_either_way():
    with pytest.raises(ValueError, match="inplace=True is not supported with precision="):
        NormOptions(inplace=True, precision="fp16")
    with pytest.raises(ValueError, match="inplace=True is not supported with precision="):
        check_option("precision", "fp16", "Where", {"inplace": True})
    with pytest.raises(ValueError, match="unknown option 'kk'"):
        check_option("kk", 3, "Where", {})


def test_layer_built_from_options_and_options_of_a_layer():
    opts = NormOptions(norm="topk", k=3, eps=1e-3, momentum=None, nonfinite="skip", impl="eager")
    layer = nm.LpBatchNorm2d(4, options=opts)
    assert (layer.norm, layer.k, layer.eps, layer.momentum, layer.nonfinite, layer.impl) == \
        ("topk", 3, 1e-3, None, "skip", "eager")
    assert layer.options == opts
    same = nm.LpBatchNorm2d(4, **opts.as_dict())
    assert same.options == opts
    x = torch.randn(8, 4, 5, 5)
    torch.testing.assert_close(layer(x), same(x), rtol=0, atol=0)


def test_layer_options_follow_assignment_and_are_not_copied():
    layer = nm.LpBatchNorm2d(4, norm="l1")
    first = layer.options
    assert layer.options is first  # cached
    layer.momentum = 0.5
    assert layer.options.momentum == 0.5 and layer.options is not first
    layer.momentum = torch.tensor(0.2)
    dup = copy.deepcopy(layer)
    assert dup.options.momentum is dup.momentum and dup.momentum is not layer.momentum
    assert "_options" not in pickle.loads(pickle.dumps(layer)).__dict__


def test_layer_assignment_errors_name_the_layer():
    layer = nm.LpBatchNorm2d(4)
    with pytest.raises(ValueError, match=r"^LpBatchNorm2d: momentum must be in \[0, 1\] or None, got 5"):
        layer.momentum = 5
    with pytest.raises(ValueError, match=r"^LpBatchNorm2d: precision must be None, a Precision or one of"):
        layer.precision = "fp7"  # the preset names live in normmatters.precision: checked by the layer
    assert layer.momentum == 0.1 and layer.precision is None


def test_options_and_a_disagreeing_argument_is_an_error():
    opts = NormOptions(norm="l2")
    with pytest.raises(ValueError, match="LpBatchNorm2d: norm='linf' disagrees with options.norm='l2'"):
        nm.LpBatchNorm2d(4, norm="linf", options=opts)
    nm.LpBatchNorm2d(4, norm="l2", options=opts)  # agreeing is fine (a default, like norm="l1", cannot be told apart)
    x = torch.randn(8, 4, 3, 3)
    with pytest.raises(ValueError, match="lp_batch_norm: eps=0.1 disagrees"):
        nm.lp_batch_norm(x, None, None, training=True, eps=0.1, options=opts)
    with pytest.raises(TypeError, match="options must be a NormOptions"):
        nm.lp_batch_norm(x, None, None, training=True, options={"norm": "l2"})


@pytest.mark.parametrize("norm", ["l1", "range", "topk"])
def test_functional_paths_with_options_equal_the_arguments(norm):
    x = torch.randn(8, 4, 5, 5, dtype=torch.float64)
    kw = dict(norm=norm, k=3, eps=1e-3, momentum=0.3)
    opts = NormOptions(**kw)
    for fn, extra in ((nm.lp_batch_norm, {}), (lean_batch_norm, {"impl": "eager"}),
                      (emulated_lp_batch_norm, {"precision": "fp32"})):
        rm_a, rv_a, rm_b, rv_b = torch.zeros(4).double(), torch.ones(4).double(), torch.zeros(4).double(), \
            torch.ones(4).double()
        ya = fn(x, rm_a, rv_a, training=True, **kw, **extra)
        o = opts.replace(**{key: v for key, v in extra.items() if key != "precision"})
        yb = fn(x, rm_b, rv_b, training=True, options=o, **({"precision": "fp32"} if "precision" in extra else {}))
        torch.testing.assert_close(ya, yb, rtol=0, atol=0)
        torch.testing.assert_close(rm_a, rm_b, rtol=0, atol=0)
        torch.testing.assert_close(rv_a, rv_b, rtol=0, atol=0)


def test_functional_cumulative_momentum_from_options():
    """options.momentum=None: the cumulative average over num_batches_tracked, as the layers."""
    xs = [torch.randn(8, 4, 3, 3) + i for i in range(3)]
    rm, rv, nbt = torch.zeros(4), torch.ones(4), torch.zeros((), dtype=torch.long)
    for x in xs:
        nm.lp_batch_norm(x, rm, rv, training=True, num_batches_tracked=nbt,
                         options=NormOptions(norm="l2", momentum=None))
    torch.testing.assert_close(rm, torch.stack([x.mean((0, 2, 3)) for x in xs]).mean(0), rtol=1e-5, atol=1e-6)
    assert int(nbt) == 3


def test_functional_errors_keep_their_caller_name():
    with pytest.raises(ValueError, match="^lp_batch_norm: nonfinite must be one of"):
        nm.lp_batch_norm(torch.randn(4, 2), None, None, training=True, nonfinite="loud")
    with pytest.raises(ValueError, match="^myfn: chunks is an option of"):
        lean_batch_norm(torch.randn(4, 2), None, None, training=True, chunks=2, where="myfn")


def test_functional_cumulative_momentum_without_a_counter_is_an_error():
    opts = NormOptions(momentum=None)
    with pytest.raises(ValueError, match="lean_batch_norm: momentum=None .* needs num_batches_tracked"):
        lean_batch_norm(torch.randn(8, 4), torch.zeros(4), torch.ones(4), training=True, options=opts)
    nm.lp_batch_norm(torch.randn(8, 4), None, None, training=True, options=opts)  # nothing to update: fine


def test_aliases_and_synced_layers_take_options():
    with pytest.raises(ValueError, match="L1BatchNorm2d always uses norm='l1'; got norm='range'"):
        nm.L1BatchNorm2d(4, options=NormOptions(norm="range"))
    assert nm.L1BatchNorm2d(4, options=NormOptions(k=3)).k == 3
    sync = nm.SyncLpBatchNorm2d(4, options=NormOptions(norm="linf", eps=1e-3))
    assert (sync.norm, sync.eps) == ("linf", 1e-3) and sync.options == NormOptions(norm="linf", eps=1e-3)
