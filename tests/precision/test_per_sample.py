"""Per-sample emulation (LpLayerNorm / LpRMSNorm / LpGroupNorm with precision=): fp32 reproduces the float32
layer, bf16 / fp16 stay within the format's tolerance, l2 in fp16 at activation scale ~300 overflows and collapses
to the bias while l1 / linf / range stay finite and right, the gradient is the float32 layer's, and bad precision
names are rejected naming the layer."""

import pytest
import torch

import normmatters as nm
from normmatters.layer_functional import emulated_lp_group_norm, emulated_lp_layer_norm, emulated_lp_rms_norm
from normmatters.precision.emulate import emulate_normalization
from normmatters.precision.per_sample import emulate_per_sample

NORMS = ("l2", "l1", "linf", "topk", "range")
#: unit roundoff of each format (relative error of one rounding)
UNIT = {"bf16": 2.0 ** -8, "fp16": 2.0 ** -11}


def _pair(cls, norm, *args, precision, **kw):
    torch.manual_seed(0)
    ref = cls(*args, norm=norm, **kw)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.rand_like(p) + 0.5 if p is ref.weight else torch.randn_like(p))
    emu = cls(*args, norm=norm, precision=precision, **kw)
    emu.load_state_dict(ref.state_dict())
    return ref, emu


def _layers(norm, precision):
    return [
        (*_pair(nm.LpLayerNorm, norm, 64, precision=precision), (4, 7, 64)),
        (*_pair(nm.LpLayerNorm, norm, (8, 16), precision=precision), (3, 8, 16)),
        (*_pair(nm.LpRMSNorm, norm, 64, precision=precision), (4, 7, 64)),
        (*_pair(nm.LpRMSNorm, norm, 64, eps=1e-6, precision=precision), (5, 64)),
        (*_pair(nm.LpGroupNorm, norm, 4, 16, precision=precision), (3, 16, 4, 4)),
    ]


@pytest.mark.parametrize("norm", NORMS)
def test_fp32_emulation_reproduces_the_float32_layer(norm):
    for ref, emu, shape in _layers(norm, "fp32"):
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 3 + 0.5
        yr, ye = ref(x), emu(x)
        assert ye.dtype == yr.dtype and ye.shape == yr.shape
        torch.testing.assert_close(ye, yr, atol=4e-6, rtol=4e-6, msg=f"{type(ref).__name__} {norm}")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("norm", ["l2", "l1", "linf", "range"])
def test_bf16_and_fp16_within_the_formats_tolerance(norm, precision):
    u = UNIT[precision]
    for ref, emu, shape in _layers(norm, precision):
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(2)) * 3 + 0.5
        yr, ye = ref(x), emu(x)
        err = ((ye - yr).abs().max() / yr.abs().max()).item()
        # a chain of ~10 roundings after a sum of n ≤ 128 terms: well inside 40 u, far outside fp32's noise
        assert err < 40 * u, f"{type(ref).__name__} {norm} {precision}: {err:.3g}"
        assert err > 0.05 * u  # the rounding did happen (a no-op emulation would give ~1e-7)


def test_fp16_l2_overflows_at_activation_scale_300_while_l1_linf_range_stay_right():
    torch.manual_seed(3)
    x = torch.randn(16, 128) * 300
    out, biases = {}, {}
    for norm in ("l2", "l1", "linf", "range"):
        ref, emu = nm.LpLayerNorm(128, norm=norm), nm.LpLayerNorm(128, norm=norm, precision="fp16")
        with torch.no_grad():
            ref.bias.normal_()
        emu.load_state_dict(ref.state_dict())
        yr, ye = ref(x), emu(x)
        out[norm], biases[norm] = ye, ref.bias.detach()
        if norm != "l2":
            assert torch.isfinite(ye).all()
            assert ((ye - yr).abs().max() / yr.abs().max()).item() < 0.02, norm
    # l2: Σ(x − μ)² = inf → σ̂ = inf → 1/σ̂ = 0 → every output is the bias
    res = emulate_per_sample(x, "l2", "fp16", eps=1e-5)
    assert torch.isinf(res.sigma).all() and res.events.counts["square"]["overflow"] > 0
    torch.testing.assert_close(out["l2"], biases["l2"].expand(16, 128), atol=0, rtol=2.0 ** -11)
    # RMS norm l2 likewise collapses (to 0: no bias); l1 stays finite and close
    rms2 = nm.LpRMSNorm(128, norm="l2", precision="fp16")(x)
    assert (rms2 == 0).all()
    r1 = nm.LpRMSNorm(128, norm="l1", precision="fp16")(x)
    r1_ref = nm.LpRMSNorm(128, norm="l1")(x)
    assert ((r1 - r1_ref).abs().max() / r1_ref.abs().max()).item() < 0.02


def test_centered_path_is_the_batch_norm_emulator_on_the_same_rows():
    x = torch.randn(6, 40, generator=torch.Generator().manual_seed(4)) * 20
    for norm in ("l2", "l1", "range"):
        for p in ("fp16", "fp8_e4m3"):
            a = emulate_per_sample(x, norm, p, eps=1e-5)
            b = emulate_normalization(x, norm, p, eps=1e-5)
            assert torch.equal(a.y, b.y) and torch.equal(a.sigma, b.sigma)
            assert a.events.counts == b.events.counts


@pytest.mark.parametrize("norm", ["l2", "l1", "range"])
def test_straight_through_gradient_is_the_float32_layers(norm):
    for ref, emu, shape in _layers(norm, "fp16"):
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(5)) * 3
        xr, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
        g = torch.randn(shape, generator=torch.Generator().manual_seed(6))
        ref(xr).backward(g)
        ye = emu(xe)
        ye.backward(g)
        assert not torch.equal(ye.detach(), ref(x).detach())  # the forward is emulated...
        torch.testing.assert_close(xe.grad, xr.grad)  # ...the gradient is the float32 layer's
        for a, b in zip(ref.parameters(), emu.parameters()):
            torch.testing.assert_close(b.grad, a.grad)


def test_gradient_stays_finite_where_the_emulated_forward_overflows():
    x = (torch.randn(4, 128) * 300).requires_grad_()
    y = nm.LpLayerNorm(128, norm="l2", precision="fp16")(x)
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all()


def test_functional_forms_match_the_layers():
    x = torch.randn(3, 16, 4, generator=torch.Generator().manual_seed(7))
    w, b = torch.rand(16) + 0.5, torch.randn(16)
    g = nm.LpGroupNorm(4, 16, norm="l1", precision="bf16")
    with torch.no_grad():
        g.weight.copy_(w), g.bias.copy_(b)
    assert torch.equal(g(x), emulated_lp_group_norm(x, 4, w, b, 1e-5, "l1", precision="bf16"))
    x2 = torch.randn(5, 16)
    ln = emulated_lp_layer_norm(x2, 16, w, b, 1e-5, "l1", precision="bf16")
    rm = emulated_lp_rms_norm(x2, 16, w, None, "l1", precision="bf16")
    assert ln.shape == rm.shape == x2.shape and not torch.equal(ln, rm)


@pytest.mark.parametrize("cls,args", [(nm.LpLayerNorm, (8,)), (nm.LpRMSNorm, (8,)), (nm.LpGroupNorm, (2, 8))])
def test_bad_precision_names_the_layer(cls, args):
    with pytest.raises(ValueError, match=f"{cls.__name__}: precision must be None, a Precision or one of"):
        cls(*args, precision="fp12")
    with pytest.raises(ValueError, match=f"{cls.__name__}: precision='int8'.*batch norm only"):
        cls(*args, precision="int8")
    m = cls(*args, precision="fp16")
    assert "precision='fp16'" in repr(m) and "precision" not in repr(cls(*args))


def test_emulate_per_sample_rejects_non_2d_input():
    with pytest.raises(ValueError, match="emulate_per_sample: expected a \\(rows, n\\) tensor"):
        emulate_per_sample(torch.randn(2, 3, 4), "l1", "fp16")
