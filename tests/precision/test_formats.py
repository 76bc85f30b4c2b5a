"""Formats: bit-exact with torch's casts over every pattern and rounding boundary; edge cases; stochastic
rounding unbiased and seeded."""

import math

import pytest
import torch

from normmatters.precision.formats import FORMATS, get_format, int_format, round_to

TORCH_FORMATS = ["fp32", "bf16", "fp16", "fp8_e4m3", "fp8_e5m2"]


def _all16(dtype: torch.dtype) -> torch.Tensor:
    return torch.arange(65536, dtype=torch.int32).to(torch.int16).view(dtype).float()


def _same(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Bitwise equal (so −0 ≠ +0), any NaN equals any NaN."""
    return (a.view(torch.int32) == b.view(torch.int32)) | (a.isnan() & b.isnan())


def _check(src: torch.Tensor, name: str) -> None:
    fmt = FORMATS[name]
    ref = src.to(fmt.torch_dtype).float()
    mine = round_to(src, fmt)
    bad = ~_same(ref, mine)
    assert not bad.any(), (f"{name}: {int(bad.sum())} mismatches, e.g. input {src[bad][:4].tolist()} "
                           f"torch {ref[bad][:4].tolist()} ours {mine[bad][:4].tolist()}")


@pytest.mark.parametrize("name", TORCH_FORMATS)
@pytest.mark.parametrize("source", ["fp16", "bf16"])
def test_every_16bit_pattern_rounds_like_torch(name, source):
    # all 2^16 fp16 / bf16 values: for the fp8 formats these include every fp8 value, every midpoint
    # between neighbours and values next to them (fp16 has 7-8 more mantissa bits), plus ±inf, NaN,
    # subnormals and huge values (bf16) that overflow
    _check(_all16(torch.float16 if source == "fp16" else torch.bfloat16), name)


def test_every_fp8_pattern_is_fixed_point():
    for name, dt in (("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)):
        v = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dt).float()
        assert v.isnan().sum() == (2 if name == "fp8_e4m3" else 6)
        assert _same(round_to(v, name), v).all()


@pytest.mark.parametrize("name,low_bits", [("fp16", 13), ("bf16", 16)])
def test_rounding_boundaries_of_16bit_formats(name, low_bits):
    # every fp16/bf16 value with the float32 bits below its mantissa set to: 0, just below the tie, the
    # tie, just above, all ones, and a random pattern; covers every rounding boundary of the format
    dt = torch.float16 if name == "fp16" else torch.bfloat16
    base = _all16(dt)
    base = base[torch.isfinite(base)]
    half = 1 << (low_bits - 1)
    offsets = [0, half - 1, half, half + 1, (1 << low_bits) - 1]
    g = torch.Generator().manual_seed(0)
    parts = [(base.view(torch.int32) | o).view(torch.float32) for o in offsets]
    rnd = torch.randint(0, 1 << low_bits, base.shape, generator=g, dtype=torch.int32)
    parts.append((base.view(torch.int32) | rnd).view(torch.float32))
    src = torch.cat(parts)
    if name == "fp16":  # fp16 bits come from float32 exponents; rebuild by float value instead of bits
        src = torch.cat([src, base * (1 + 2.0 ** -11), base * (1 - 2.0 ** -12), base * (1 + 2.0 ** -12)])
    for fmt in TORCH_FORMATS:
        _check(src, fmt)


def test_fp16_edge_cases():
    x = torch.tensor([65504.0, 65519.99, 65520.0, -65520.0, 2.0 ** -24, 2.0 ** -25, 2.0 ** -25 * 1.01,
                      2.0 ** -14 - 2.0 ** -24])
    y = round_to(x, "fp16")
    assert y.tolist() == [65504.0, 65504.0, math.inf, -math.inf, 2.0 ** -24, 0.0, 2.0 ** -24,
                          2.0 ** -14 - 2.0 ** -24]


def test_e4m3_saturates_like_torch_and_e5m2_overflows():
    x = torch.tensor([448.0, 464.0, 480.0, 1e6, math.inf, -math.inf, math.nan])
    assert round_to(x, "fp8_e4m3")[:6].tolist() == [448.0, 448.0, 448.0, 448.0, 448.0, -448.0]
    assert x.to(torch.float8_e4m3fn).float()[:6].tolist() == [448.0, 448.0, 448.0, 448.0, 448.0, -448.0]
    assert round_to(x, "fp8_e4m3")[6].isnan()
    y = round_to(torch.tensor([57344.0, 61439.0, 61440.0, math.inf]), "fp8_e5m2")
    assert y.tolist() == [57344.0, 57344.0, math.inf, math.inf]


def test_float64_input_is_rounded_once():
    x = torch.tensor([1 + 2.0 ** -8 + 2.0 ** -40], dtype=torch.float64)
    assert round_to(x, "bf16").item() == 1 + 2.0 ** -7  # torch's cast double-rounds through float32 to 1
    assert round_to(x, "bf16").dtype == torch.float64


def test_int_format():
    f = int_format(8, 0.5)
    x = torch.tensor([0.25, 0.75, 1.26, 100.0, -100.0, math.inf, -math.inf, math.nan])
    y = round_to(x, f)
    assert y[:7].tolist() == [0.0, 1.0, 1.5, 63.5, -64.0, 63.5, -64.0]
    assert y[7].isnan()
    assert get_format("int4", scale=2.0).max == 14.0
    with pytest.raises(ValueError, match="bits must be an int in 4..16"):
        int_format(3)
    with pytest.raises(ValueError, match="unknown number format 'fp12'"):
        get_format("fp12")


@pytest.mark.parametrize("name", ["fp16", "bf16", "fp8_e4m3", "int8"])
def test_stochastic_rounding_unbiased_and_seeded(name):
    fmt = get_format(name, scale=0.25)
    x = torch.tensor([1.0 + 1e-3, 3.3, -0.1234, 0.0301], dtype=torch.float64).repeat(200_000, 1)
    g = torch.Generator().manual_seed(7)
    y = round_to(x, fmt, "stochastic", generator=g)
    err = (y - x).mean(0)
    ulp = (round_to(x[0], fmt, "nearest") - x[0]).abs().max() * 2 + 1e-12
    assert (err.abs() < 0.02 * ulp.max()).all(), err
    # the draws really round both ways (not nearest in disguise)
    assert ((y != y[0]).any(0)).all()
    y2 = round_to(x, fmt, "stochastic", generator=torch.Generator().manual_seed(7))
    assert torch.equal(y, y2)
    y3 = round_to(x, fmt, "stochastic", generator=torch.Generator().manual_seed(8))
    assert not torch.equal(y, y3)
    # representable values never move
    v = round_to(x[0], fmt)
    assert torch.equal(round_to(v.repeat(1000, 1), fmt, "stochastic", generator=g), v.repeat(1000, 1))


@pytest.mark.parametrize("name", TORCH_FORMATS)
def test_float64_fast_path_equals_generic_rounding(name):
    # nearest rounding of float64 goes float64 → float32 (round to odd) → torch cast; the generic
    # frexp path is the definition. Random values over 2^±30, every fp16 midpoint and its neighbours.
    from normmatters.precision.formats import FloatFormat

    f = FORMATS[name]
    generic = FloatFormat(f.name, f.mbits, f.emin, f.max_value, f.saturate, None)
    g = torch.Generator().manual_seed(0)
    v = torch.randn(100_000, generator=g, dtype=torch.float64) * 2.0 ** torch.randint(-30, 30, (100_000,),
                                                                                        generator=g)
    h = _all16(torch.float16).double()
    h = h[torch.isfinite(h)].sort().values
    mid = (h[1:] + h[:-1]) / 2
    v = torch.cat([v, mid, mid * (1 + 2.0 ** -45), mid * (1 - 2.0 ** -45),
                   torch.tensor([1e300, -1e300, 1e-300, math.inf, math.nan, -0.0], dtype=torch.float64)])
    a, b = round_to(v, f), round_to(v, generic)
    same = (a == b) & (torch.signbit(a) == torch.signbit(b)) | (a.isnan() & b.isnan())
    assert same.all(), v[~same][:4].tolist()
