"""convert_norms / to_torch_norms: swap per-sample norms both ways, keeping parameters, dtype, device, mode."""

import copy

import pytest
import torch
from torch import nn

import normmatters as nm


def _model(dtype=torch.float32):
    return nn.Sequential(nn.Conv1d(16, 16, 3, padding=1, dtype=dtype), nn.GroupNorm(4, 16, dtype=dtype),
                         nn.Flatten(), nn.Linear(16 * 8, 32, dtype=dtype), nn.LayerNorm(32, dtype=dtype),
                         nn.Linear(32, 32, dtype=dtype), nn.RMSNorm(32, dtype=dtype),
                         nn.LayerNorm(32, bias=False, dtype=dtype))


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_l2_round_trip_keeps_outputs_parameters_and_mode(dtype, atol, device):
    torch.manual_seed(0)
    model = _model(dtype).to(device)
    for p in model.parameters():
        with torch.no_grad():
            p.add_(torch.rand_like(p) * 0.3)
    model.eval()
    model[4].train()  # a layer in another mode keeps it
    x = torch.randn(5, 16, 8, dtype=dtype, device=device)
    ref = model(x)
    params = {id(p) for p in model.parameters()}
    keys = set(model.state_dict())
    nm.convert_norms(model, norm="l2")
    assert isinstance(model[1], nm.LpGroupNorm) and isinstance(model[4], nm.LpLayerNorm)
    assert isinstance(model[6], nm.LpRMSNorm) and isinstance(model[7], nm.LpLayerNorm) and model[7].bias is None
    assert {id(p) for p in model.parameters()} == params and set(model.state_dict()) == keys
    assert model[4].training and not model[1].training
    assert {p.device for p in model.parameters()} == {x.device}
    torch.testing.assert_close(model(x), ref, atol=atol, rtol=0)
    nm.to_torch_norms(model)
    assert type(model[1]) is nn.GroupNorm and type(model[4]) is nn.LayerNorm and type(model[6]) is nn.RMSNorm
    assert {id(p) for p in model.parameters()} == params and model[4].training
    torch.testing.assert_close(model(x), ref, atol=atol, rtol=0)


def test_kinds_norm_and_dtype():
    model = _model(torch.float64)
    nm.convert_norms(model, norm="linf", kinds=("layer",))
    assert isinstance(model[4], nm.LpLayerNorm) and model[4].norm == "linf" and model[4].weight.dtype == torch.float64
    assert type(model[1]) is nn.GroupNorm and type(model[6]) is nn.RMSNorm
    assert nm.convert_norms(nn.GroupNorm(2, 8), norm="topk").norm == "topk"
    new = nm.convert_norms(nn.RMSNorm(8, eps=None, elementwise_affine=False), norm="l1")
    assert isinstance(new, nm.LpRMSNorm) and new.eps is None and new.weight is None


def test_bad_arguments():
    with pytest.raises(ValueError, match="convert_norms: unknown kinds \\['batch'\\]"):
        nm.convert_norms(_model(), kinds=("layer", "batch"))
    with pytest.raises(ValueError, match="convert_norms: unknown norm 'l7'"):
        nm.convert_norms(_model(), norm="l7")


@pytest.mark.parametrize("layer", [nn.LayerNorm(64), nn.RMSNorm(64), nn.GroupNorm(4, 64)])
def test_single_layer_float32_within_1e_6_both_ways(layer, device):
    torch.manual_seed(0)
    x = torch.randn(8, 64, 3, device=device) * 3 + 1
    x = x[..., 0] if not isinstance(layer, nn.GroupNorm) else x
    layer = copy.deepcopy(layer).to(device)  # the parametrized instance is shared across runs
    layer.eval()
    ref = layer(x)
    lp = nm.convert_norms(layer, norm="l2")
    torch.testing.assert_close(lp(x), ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(nm.to_torch_norms(lp)(x), ref, atol=1e-6, rtol=0)


def test_instance_norms_convert_and_back():
    m = nn.Sequential(nn.InstanceNorm1d(3, affine=True, track_running_stats=True), nn.InstanceNorm2d(3))
    x = torch.randn(2, 3, 4)
    y0, weight, running_var = m[0](x), m[0].weight, m[0].running_var
    c = nm.convert_norms(m, norm="l1", kinds=("instance",))
    assert [type(mod) for mod in c] == [nm.LpInstanceNorm1d, nm.LpInstanceNorm2d]
    assert c[0].weight is weight and c[0].running_var is running_var
    back = nm.to_torch_norms(c)
    assert [type(mod) for mod in back] == [nn.InstanceNorm1d, nn.InstanceNorm2d]
    torch.testing.assert_close(back[0](x), y0)


def _hf_models():
    T = pytest.importorskip("transformers", reason="the Hugging Face checks need transformers (the test extra)")
    T.logging.set_verbosity_error()
    cfg = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2)
    return T, {
        "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**cfg)),
        "gemma": lambda: T.GemmaForCausalLM(T.GemmaConfig(**cfg, head_dim=8)),
        "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**cfg)),
        "t5": lambda: T.T5ForConditionalGeneration(T.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                               num_heads=4)),
        "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
        "bert": lambda: T.BertForMaskedLM(T.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                       num_attention_heads=4, intermediate_size=64)),
    }


@pytest.mark.parametrize("family", ["llama", "gemma", "qwen2", "t5", "gpt2", "bert"])
def test_hugging_face_models_convert_exactly_back_and_train(family):
    _, models = _hf_models()
    torch.manual_seed(0)
    m = models[family]().eval()
    with torch.no_grad():  # non-trivial norm weights (Gemma stores weight − 1)
        for mod in m.modules():
            if "norm" in type(mod).__name__.lower() and getattr(mod, "weight", None) is not None:
                mod.weight.uniform_(-0.5, 0.5)
    ids = torch.randint(0, 64, (2, 10))
    kw = {"decoder_input_ids": ids} if family == "t5" else {}
    norms = {name: type(mod) for name, mod in m.named_modules() if "norm" in type(mod).__name__.lower()}
    with torch.no_grad():
        y0 = m(input_ids=ids, **kw).logits
        c, rep = nm.convert_norms(copy.deepcopy(m), norm="l2", report=True)
        assert len(rep.converted) == len(norms) > 0 and not rep.skipped
        assert all(isinstance(mod, (nm.LpLayerNorm, nm.LpRMSNorm)) for name, mod in c.named_modules() if name in norms)
        torch.testing.assert_close(c(input_ids=ids, **kw).logits, y0, atol=1e-4, rtol=1e-4)
        back = nm.to_torch_norms(c)
        assert {name: type(mod) for name, mod in back.named_modules() if name in norms} == norms
        torch.testing.assert_close(back(input_ids=ids, **kw).logits, y0, atol=1e-4, rtol=1e-4)
    c1 = nm.convert_norms(copy.deepcopy(m), norm="l1").train()
    loss = c1(input_ids=ids, labels=ids, **kw).loss
    loss.backward()
    norm_grads = [mod.weight.grad for mod in c1.modules() if isinstance(mod, (nm.LpLayerNorm, nm.LpRMSNorm))]
    assert torch.isfinite(loss) and all(g is not None and torch.isfinite(g).all() for g in norm_grads)
