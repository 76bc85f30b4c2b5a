"""The adapted Lp layers: channels-first layer norm, norm + activation, and the Hugging Face RMS-norm forms with
their numerics (dtype of the result, where the cast happens, Gemma's 1 + weight)."""

import pytest
import torch
from torch import nn

import normmatters as nm

transformers = pytest.importorskip("transformers", reason="the Hugging Face forms are checked against transformers")


def test_channels_first_layer_norm_and_norm_act():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 3, 4)
    ln = nm.LpLayerNorm2d(6, norm="l2")
    ref = nn.LayerNorm(6)
    torch.testing.assert_close(ln(x), ref(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
    act = nm.LpLayerNormAct2d(6, norm="l1", act=nn.ReLU())
    assert (act(x) >= 0).all() and act(x).shape == x.shape
    bn = nm.LpBatchNormAct2d(6, norm="l2", act=nn.ReLU())
    torch.testing.assert_close(bn(x), torch.relu(nn.BatchNorm2d(6)(x)))
    assert set(nm.LpGroupNormAct(2, 6, norm="l1").state_dict()) == {"weight", "bias"}
    with pytest.raises(ValueError, match="LpLayerNorm2d: expected"):
        ln(torch.randn(6))


def _hf(name):
    import importlib
    fam = {"llama": ("llama", "LlamaRMSNorm"), "gemma": ("gemma", "GemmaRMSNorm"), "t5": ("t5", "T5LayerNorm")}
    mod, cls = fam[name]
    return getattr(importlib.import_module(f"transformers.models.{mod}.modeling_{mod}"), cls)


@pytest.mark.parametrize("cast", ["llama", "gemma", "t5"])
@pytest.mark.parametrize("wdtype, xdtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16),
                                            (torch.float32, torch.float32)])
def test_hf_forms_keep_each_familys_numerics(cast, wdtype, xdtype):
    torch.manual_seed(1)
    ref = _hf(cast)(16, eps=1e-6).to(wdtype)
    with torch.no_grad():
        ref.weight.uniform_(-0.5, 0.5)
    ours = nm.LpHFRMSNorm(16, norm="l2", eps=1e-6, cast=cast, dtype=wdtype)
    ours.load_state_dict(ref.state_dict())
    x = (torch.randn(3, 5, 16) * 3).to(xdtype)
    want, got = ref(x), ours(x)
    assert got.dtype == want.dtype
    tol = 1e-5 if want.dtype == torch.float32 and xdtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    gain = ours._nm_gain().detach().clone()
    ours._nm_scale_gain(torch.tensor(2.0))
    torch.testing.assert_close(ours._nm_gain().detach().float(), (2 * gain).float(), atol=2e-2, rtol=2e-2)
    with pytest.raises(ValueError, match="cast must be one of"):
        nm.LpHFRMSNorm(16, cast="mistral")
