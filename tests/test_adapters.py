"""The adapter registry and the verified conversion: stock classes matched exactly, model-zoo classes through
adapters (by module + name, mirrored here without timm / torchvision), every replacement verified by its l2
counterpart, subclasses without an adapter left as they are (one warning per class; strict raises)."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normmatters as nm
from normmatters.adapters import Adapter, batch_norm_to_lp, find_adapter, move_state, register_adapter


def _zoo_class(module, name, base, forward, init=None):
    ns = {"forward": forward, "__module__": module, "__qualname__": name}
    if init is not None:
        ns["__init__"] = init
    return type(name, (base,), ns)


def _ln2d_forward(self, x):  # the timm / torchvision ConvNeXt pattern
    return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                        self.eps).permute(0, 3, 1, 2)


def _bnact_init(self, num_features, act_layer=nn.ReLU):
    nn.BatchNorm2d.__init__(self, num_features)
    self.drop = nn.Identity()
    self.act = act_layer()


def _bnact_forward(self, x):
    return self.act(self.drop(nn.BatchNorm2d.forward(self, x)))


TimmLayerNorm2d = _zoo_class("timm.layers.norm", "LayerNorm2d", nn.LayerNorm, _ln2d_forward)
TvLayerNorm2d = _zoo_class("torchvision.models.convnext", "LayerNorm2d", nn.LayerNorm, _ln2d_forward)
TimmBatchNormAct2d = _zoo_class("timm.layers.norm_act", "BatchNormAct2d", nn.BatchNorm2d, _bnact_forward, _bnact_init)
MyLayerNorm2d = _zoo_class(__name__, "MyLayerNorm2d", nn.LayerNorm, _ln2d_forward)


def _randomize(model):
    with torch.no_grad():
        for m in model.modules():
            for name in ("weight", "bias"):
                t = getattr(m, name, None)
                if isinstance(t, nn.Parameter) and not isinstance(m, nn.Conv2d):
                    t.uniform_(0.5, 1.5) if name == "weight" else t.uniform_(-0.5, 0.5)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
    return model


def _zoo():
    torch.manual_seed(0)
    return _randomize(nn.Sequential(nn.Conv2d(3, 8, 1), TimmLayerNorm2d(8), TvLayerNorm2d(8), TimmBatchNormAct2d(8),
                                    nn.BatchNorm2d(8), nn.GroupNorm(2, 8), nn.InstanceNorm2d(8, affine=True),
                                    MyLayerNorm2d(8))).eval()


@pytest.mark.filterwarnings("ignore:convert_norms.*MyLayerNorm2d")
def test_zoo_classes_convert_exactly_with_l2_and_keep_their_function():
    m, x = _zoo(), torch.randn(2, 3, 5, 6)
    y0 = m(x)
    with pytest.warns(UserWarning, match="MyLayerNorm2d subclasses LayerNorm but has no conversion adapter"):
        c, rep = nm.convert_norms(copy.deepcopy(m), norm="l2", report=True)
        c, rep_bn = nm.convert_batchnorm(c, norm="l2", report=True)
    assert [type(mod).__name__ for mod in c][1:] == ["LpLayerNorm2d", "LpLayerNorm2d", "LpBatchNormAct2d",
                                                     "LpBatchNorm2d", "LpGroupNorm", "LpInstanceNorm2d",
                                                     "MyLayerNorm2d"]
    # (instance norm of a channel with small variance after the relu: float32 rounding of x − μ, amplified by 1/σ)
    torch.testing.assert_close(c(x), y0, atol=5e-4, rtol=1e-4)
    assert [s[0] for s in rep.skipped] == ["7"] and len(rep.converted) == 4 and len(rep_bn.converted) == 2
    assert "MyLayerNorm2d" in str(rep)
    assert c.state_dict().keys() == m.state_dict().keys()
    l1 = nm.convert_batchnorm(nm.convert_norms(copy.deepcopy(m), norm="l1"), norm="l1")
    assert (l1[:4](x) >= 0).all() and isinstance(l1[3].act, nn.ReLU)  # the activation is kept
    out = l1[1](torch.randn(2, 8, 3, 4))
    assert out.shape == (2, 8, 3, 4) and out.mean(1).abs().max() < 1e-4 + l1[1].bias.abs().max()
    back = nm.to_torch_batchnorm(nm.to_torch_norms(c))
    assert [type(mod) for mod in back] == [type(mod) for mod in m]
    torch.testing.assert_close(back(x), y0, atol=5e-4, rtol=1e-4)


def test_strict_raises_and_one_warning_per_class():
    m = nn.Sequential(MyLayerNorm2d(4), MyLayerNorm2d(4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        nm.convert_norms(m, norm="l1")
    assert len([w for w in caught if "MyLayerNorm2d" in str(w.message)]) == 1
    with pytest.raises(TypeError, match="MyLayerNorm2d"):
        nm.convert_norms(m, norm="l1", strict=True)
    for fn in (nm.convert_batchnorm, nm.convert_norms, nm.to_torch_batchnorm, nm.to_torch_norms):
        with pytest.raises(TypeError, match="module must be an nn.Module, got str"):
            fn("x")


def test_a_failed_verification_leaves_the_module_and_a_user_adapter_converts_it():
    class Scaled(nn.BatchNorm1d):  # does more than the adapter below knows
        def forward(self, x):
            return 2 * super().forward(x)

    wrong = Adapter("batch", batch_norm_to_lp(nm.LpBatchNorm1d), lambda m: (4, m.num_features))
    register_adapter(Scaled, wrong)
    try:
        assert find_adapter(Scaled) is wrong and find_adapter(nn.BatchNorm1d) is not wrong
        m = nn.Sequential(Scaled(3))
        with pytest.warns(UserWarning, match="differs from the original"):
            out, rep = nm.convert_batchnorm(m, norm="l1", report=True)
        assert type(out[0]) is Scaled and "differs" in rep.skipped[0][2]
        with pytest.raises(ValueError, match="differs from the original"):
            nm.convert_batchnorm(m, norm="l1", strict=True)

        class LpScaled(nm.LpBatchNorm1d):
            def forward(self, x):
                return 2 * super().forward(x)

        def to_lp(mod, norm, options):
            new = LpScaled(mod.num_features, norm=norm, eps=mod.eps, momentum=mod.momentum)
            return move_state(mod, new)

        register_adapter(Scaled, Adapter("batch", to_lp, lambda m: (4, m.num_features)))
        out = nm.convert_batchnorm(m, norm="l1")
        assert type(out[0]) is LpScaled
        back = nm.to_torch_batchnorm(out)
        assert type(back[0]) is Scaled and back[0].weight is out[0].weight
    finally:
        nm.unregister_adapter(Scaled)
    assert find_adapter(Scaled) is None


def test_to_torch_batchnorm_sync_false_gives_plain_layers():
    s = nn.Sequential(nm.SyncLpBatchNorm2d(4, norm="l1"), nm.SyncLpBatchNorm(4, norm="l1"))
    back = nm.to_torch_batchnorm(copy.deepcopy(s))
    assert [type(m) for m in back] == [nn.SyncBatchNorm, nn.SyncBatchNorm]
    with pytest.warns(UserWarning, match="no fixed rank"):
        back = nm.to_torch_batchnorm(copy.deepcopy(s), sync=False)
    assert [type(m) for m in back] == [nn.BatchNorm2d, nn.SyncBatchNorm]
    back = nm.to_torch_batchnorm(copy.deepcopy(s), sync=False, example_input=torch.randn(2, 4, 3, 3))
    assert [type(m) for m in back] == [nn.BatchNorm2d, nn.BatchNorm2d]
    conv = nm.convert_batchnorm(nn.Sequential(nn.BatchNorm2d(4)), norm="l1", sync=True)
    assert type(conv[0]) is nm.SyncLpBatchNorm2d


def test_adapted_layers_built_directly_stay_and_sync_batchnorm_is_verified_in_eval():
    m = nn.Sequential(nm.LpBatchNormAct2d(4, norm="l1", act=nn.ReLU()), nm.LpLayerNorm2d(4, norm="l1"))
    back, rep = nm.to_torch_batchnorm(m, report=True)
    assert type(back[0]) is nm.LpBatchNormAct2d and "no stock counterpart" in rep.skipped[0][2]
    back, rep = nm.to_torch_norms(m, report=True)
    assert type(back[1]) is nm.LpLayerNorm2d and "no stock counterpart" in rep.skipped[0][2]
    out, rep = nm.convert_batchnorm(nn.Sequential(nn.SyncBatchNorm(4)), norm="l1", report=True)
    assert type(out[0]) is nm.SyncLpBatchNorm and rep.converted == [("0", "SyncBatchNorm", "SyncLpBatchNorm")]


@pytest.mark.filterwarnings("ignore:convert_norms")
def test_group_norm_without_bias_is_reported_or_converted():
    g = nn.GroupNorm(2, 4, bias=False)
    out, rep = nm.convert_norms(nn.Sequential(g), norm="l2", report=True)
    if type(out[0]) is nn.GroupNorm:  # LpGroupNorm without bias= yet
        assert "bias" in rep.skipped[0][2]
    else:
        assert out[0].bias is None and rep.converted
