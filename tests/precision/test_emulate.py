"""Emulator: summation order effects, fp32 ≡ native, the fp16 overflow of l2 at scale 300, events."""

import pytest
import torch

import normmatters as nm
from normmatters.precision.emulate import (
    PRESETS,
    Precision,
    emulate_normalization,
    emulated_sum,
    get_precision,
)


def test_sequential_fp16_sum_of_ones_stalls_at_2048():
    ones = torch.ones(3, 4096)
    assert emulated_sum(ones, "fp16", "sequential").tolist() == [2048.0] * 3
    assert emulated_sum(ones, "fp16", "pairwise").tolist() == [4096.0] * 3
    assert emulated_sum(ones, "fp16", "blocked", block=64).tolist() == [4096.0] * 3
    assert emulated_sum(ones, "fp32", "sequential").tolist() == [4096.0] * 3


def test_sum_rounds_every_partial_sum():
    # 1 + 2^-11 + 2^-11 in fp16: each addition is a tie back to 1 sequentially; pairwise adds 2^-10 first
    x = torch.tensor([[1.0, 2.0 ** -11, 2.0 ** -11, 0.0]])
    assert emulated_sum(x, "fp16", "sequential").item() == 1.0
    assert emulated_sum(x, "fp16", "pairwise").item() == 1.0  # (1 + 2^-11) ties to 1, then + 2^-11 ties
    y = torch.tensor([[2.0 ** -11, 2.0 ** -11, 1.0, 0.0]])
    assert emulated_sum(y, "fp16", "pairwise").item() == 1.0 + 2.0 ** -10
    with pytest.raises(ValueError, match="order must be one of"):
        emulated_sum(x, "fp16", "random")


NORMS = ["l2", "l1", "linf", "topk", "range", "mean"]


@pytest.mark.parametrize("norm", NORMS)
def test_fp32_emulation_equals_native_layer(norm):
    torch.manual_seed(1)
    x = torch.randn(16, 6, 5, 3) * 3 + 1
    kw = {"chunks": 2} if norm == "range" else {}
    a = nm.LpBatchNorm2d(6, norm=norm, **kw)
    b = nm.LpBatchNorm2d(6, norm=norm, precision="fp32", **kw)
    with torch.no_grad():
        a.weight.uniform_(0.5, 2)
        a.bias.normal_()
    b.load_state_dict(a.state_dict())
    for _ in range(2):
        torch.testing.assert_close(b(x), a(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.running_mean, a.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.running_var, a.running_var, rtol=1e-5, atol=1e-6)
    assert b.num_batches_tracked.item() == 2
    a.eval()
    b.eval()
    torch.testing.assert_close(b(x), a(x))


def test_fp32_emulation_with_ghost_batches_and_1d():
    torch.manual_seed(2)
    x = torch.randn(12, 5) * 10
    a = nm.LpBatchNorm1d(5, norm="l1", ghost_batch_size=4)
    b = nm.LpBatchNorm1d(5, norm="l1", ghost_batch_size=4, precision="fp32")
    torch.testing.assert_close(b(x), a(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.running_var, a.running_var)


def _fp16_error(norm, seed=0, scale=300.0):
    torch.manual_seed(seed)
    x = torch.randn(8, 8, 4, 4) * scale  # n = 128 per channel
    ref = nm.LpBatchNorm2d(8, norm=norm)(x)
    layer = nm.LpBatchNorm2d(8, norm=norm, precision="fp16", nonfinite="ignore")
    y = layer(x)
    rows = x.permute(1, 0, 2, 3).reshape(8, -1)
    events = emulate_normalization(rows, norm, "fp16").events
    return ((y - ref).abs().max() / ref.abs().max()).item(), events


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fp16_l2_fails_at_scale_300_while_l1_and_range_hold(seed):
    err, ev = _fp16_error("l2", seed)
    assert err > 0.05 or ev.total("overflow") > 0
    assert ev.counts["square"]["overflow"] > 0  # (x − μ)² > 65504 once |x − μ| > 255.9
    for norm in ("l1", "range", "linf"):
        err, ev = _fp16_error(norm, seed)
        assert err < 0.02, (norm, err)
        assert ev.total("overflow") == 0 and ev.total("nan") == 0


def test_l2_raises_when_emulated_statistics_overflow():
    x = torch.randn(8, 8, 4, 4) * 300
    with pytest.raises(nm.NonFiniteBatchError, match="square: overflow"):
        nm.LpBatchNorm2d(8, norm="l2", precision="fp16", nonfinite="raise")(x)
    layer = nm.LpBatchNorm2d(8, norm="l2", precision="fp16")  # the default: skipped, counted
    layer(x)
    assert layer.skipped_batches == 1 and int(layer.num_batches_tracked) == 0


def test_fp16_at_small_scale_underflows_the_input():
    x = torch.randn(4, 64, dtype=torch.float64) * 2.0 ** -26
    ev = emulate_normalization(x, "l1", "fp16").events
    assert ev.counts["input"]["underflow"] > 0
    ev32 = emulate_normalization(x, "l1", "fp32").events
    assert ev32.total("underflow") == 0


def test_straight_through_gradient_is_the_native_gradient():
    torch.manual_seed(3)
    x = torch.randn(16, 4, 3, 3) * 5
    gy = torch.randn_like(x)
    grads = []
    for prec in (None, "fp16", "fp8_e4m3", "int8"):
        layer = nm.LpBatchNorm2d(4, norm="range", precision=prec)
        xi = x.clone().requires_grad_()
        y = layer(xi)
        if prec is not None:
            assert not torch.equal(y, nm.LpBatchNorm2d(4, norm="range")(x))  # the forward is emulated
        (y * gy).sum().backward()
        grads.append((xi.grad, layer.weight.grad, layer.bias.grad))
    for g in grads[1:]:
        for a, b in zip(g, grads[0], strict=True):
            torch.testing.assert_close(a, b)


def test_int8_range_follows_the_quantized_scheme():
    torch.manual_seed(4)
    x = torch.randn(32, 6, 4, 4) * 3
    ref = nm.LpBatchNorm2d(6, norm="range")(x)
    y = nm.LpBatchNorm2d(6, norm="range", precision="int8")(x)
    assert y.unique().numel() <= 256  # the output is 8-bit (one grid over the tensor)
    assert ((y - ref).abs().max() / ref.abs().max()).item() < 0.03


def test_fp16_output_values_are_fp16():
    x = torch.randn(8, 3, 4, 4)
    y = nm.LpBatchNorm2d(3, norm="l1", precision="fp16")(x)
    assert torch.equal(y, y.half().float())
    yh = nm.LpBatchNorm2d(3, norm="l1", precision="bf16")(x.half())
    assert yh.dtype == torch.float16


def test_stochastic_precision_is_seeded():
    x = torch.randn(6, 256, dtype=torch.float64) * 7
    p = Precision.uniform("bf16", rounding="stochastic", seed=5)
    a = emulate_normalization(x, "l1", p).y
    b = emulate_normalization(x, "l1", p).y
    c = emulate_normalization(x, "l1", Precision.uniform("bf16", rounding="stochastic", seed=6)).y
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_layer_validates_precision():
    msg = r"LpBatchNorm2d: precision must be None, a Precision or one of .*'fp16'.*got 'fp12'"
    with pytest.raises(ValueError, match=msg):
        nm.LpBatchNorm2d(4, precision="fp12")
    m = nm.LpBatchNorm2d(4, precision="fp8_e5m2")
    assert "precision='fp8_e5m2'" in repr(m)
    assert get_precision("fp16") is PRESETS["fp16"]
    with pytest.raises(ValueError, match="order must be one of"):
        Precision.uniform("fp16", order="zigzag")
