"""Number formats and rounding: fp32, bf16, fp16, fp8 (e4m3fn, e5m2) and signed fixed-point intN.

A value is *in* a format when rounding leaves it unchanged. Every format here is a subset of the float32
values, so rounded tensors are stored as float32 (or float64) tensors holding representable values.

Floating-point formats (p = ``mbits`` + 1 significand bits, minimum normal exponent ``emin``)::

    e      = max(floor(log2 |v|), emin)          exponent of the leading bit; emin below → subnormals
    q      = 2^(e − mbits)                        the spacing (ulp) of the format around v
    round  = q · rne(v / q)                       rne: round half to even  (nearest mode)
           = q · floor(v / q + u), u ~ U[0, 1)    stochastic mode: P(up) = frac(v / q), so E[round] = v
    |round| > max  →  ±inf, or ±max for a saturating format (fp8 e4m3fn)

======== ===== ====== ============== ========================================================
name     mbits emin   max            overflow
======== ===== ====== ============== ========================================================
fp32     23    −126   3.4028e38      inf
bf16     7     −126   3.3895e38      inf
fp16     10    −14    65504          inf (65520 = 65504 + ulp/2 is a tie to even → inf)
fp8_e4m3 3     −6     448            saturates to ±448, also for ±inf (torch's cast does this)
fp8_e5m2 2     −14    57344          inf
======== ===== ====== ============== ========================================================

NaN stays NaN. The division v / q and the product with q are exact (powers of two), so rounding a float64
value is a single correct rounding. For float32 inputs the result is bit-exact with ``x.to(dtype)`` for
``torch.float16``, ``torch.bfloat16``, ``torch.float8_e4m3fn`` and ``torch.float8_e5m2`` (tests check every
bit pattern and every rounding boundary). For float64 inputs torch casts through float32 first (double
rounding: ``torch.tensor(1 + 2**-8 + 2**-40, dtype=torch.float64).bfloat16()`` gives 1, not 1 + 2**-7);
here float64 inputs are rounded once, correctly.

Signed fixed point ``intN`` with a ``scale``: values ``k · scale`` for integers
``−2^(N−1) ≤ k ≤ 2^(N−1) − 1``; rounding ``scale · rne(v / scale)`` saturates at the ends (±inf too);
NaN has no integer code and is kept as NaN so the emulator can count it.

References: IEEE 754-2019; Micikevicius et al. 2022 "FP8 formats for deep learning" (e4m3fn, e5m2);
Gupta et al. 2015 "Deep learning with limited numerical precision" (stochastic rounding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Format", "FloatFormat", "IntFormat", "FORMATS", "get_format", "int_format", "round_to",
           "ROUNDING_MODES"]

ROUNDING_MODES = ("nearest", "stochastic")


@dataclass(frozen=True)
class Format:
    """Base class; ``name`` is the registry key."""

    name: str

    @property
    def max(self) -> float:
        raise NotImplementedError

    @property
    def tiny(self) -> float:
        """The smallest positive representable value."""
        raise NotImplementedError

    @property
    def saturates(self) -> bool:
        raise NotImplementedError


@dataclass(frozen=True)
class FloatFormat(Format):
    """Binary floating point with ``mbits`` stored mantissa bits and minimum normal exponent ``emin``."""

    mbits: int = 23
    emin: int = -126
    max_value: float = 0.0
    saturate: bool = False
    torch_dtype: torch.dtype | None = None

    @property
    def max(self) -> float:
        return self.max_value

    @property
    def tiny(self) -> float:
        return 2.0 ** (self.emin - self.mbits)

    @property
    def saturates(self) -> bool:
        return self.saturate

    @property
    def unit_roundoff(self) -> float:
        """u = 2^−(mbits+1): the relative error bound of one round-to-nearest."""
        return 2.0 ** -(self.mbits + 1)


@dataclass(frozen=True)
class IntFormat(Format):
    """Signed fixed point: ``bits``-bit two's-complement integers times ``scale``."""

    bits: int = 8
    scale: float = 1.0

    @property
    def max(self) -> float:
        return (2 ** (self.bits - 1) - 1) * self.scale

    @property
    def min(self) -> float:
        return -(2 ** (self.bits - 1)) * self.scale

    @property
    def tiny(self) -> float:
        return self.scale

    @property
    def saturates(self) -> bool:
        return True


def _fmax(mbits: int, emax: int) -> float:
    return (2.0 - 2.0 ** -mbits) * 2.0 ** emax


FORMATS: dict[str, FloatFormat] = {
    "fp32": FloatFormat("fp32", 23, -126, _fmax(23, 127), False, torch.float32),
    "bf16": FloatFormat("bf16", 7, -126, _fmax(7, 127), False, torch.bfloat16),
    "fp16": FloatFormat("fp16", 10, -14, 65504.0, False, torch.float16),
    "fp8_e4m3": FloatFormat("fp8_e4m3", 3, -6, 448.0, True, torch.float8_e4m3fn),
    "fp8_e5m2": FloatFormat("fp8_e5m2", 2, -14, 57344.0, False, torch.float8_e5m2),
}
_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16",
            "fp8_e4m3fn": "fp8_e4m3", "e4m3": "fp8_e4m3", "e5m2": "fp8_e5m2"}


def int_format(bits: int, scale: float = 1.0) -> IntFormat:
    """Signed fixed point with ``bits`` in 4…16 (32 is allowed too, for accumulators)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not (4 <= bits <= 16 or bits == 32):
        raise ValueError(f"int_format: bits must be an int in 4..16 (or 32), got {bits!r}")
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"int_format: scale must be a positive finite number, got {scale!r}")
    return IntFormat(f"int{bits}", bits, float(scale))


def get_format(name: str | Format, scale: float = 1.0) -> Format:
    """A format by name: ``fp32, bf16, fp16, fp8_e4m3, fp8_e5m2`` (aliases: ``float16``, ``fp8_e4m3fn``, …)
    or ``int4`` … ``int16`` (with ``scale``). A :class:`Format` passes through."""
    if isinstance(name, Format):
        return name
    if not isinstance(name, str):
        raise ValueError(f"unknown number format {name!r}: expected a Format or one of "
                         f"{', '.join(FORMATS)}, int4..int16")
    key = _ALIASES.get(name.lower(), name.lower())
    if key in FORMATS:
        return FORMATS[key]
    if key.startswith("int") and key[3:].isdigit():
        return int_format(int(key[3:]), scale)
    raise ValueError(f"unknown number format {name!r}: expected one of {', '.join(FORMATS)}, int4..int16")


def _exp2(e: Tensor) -> Tensor:
    return torch.exp2(e.to(torch.float64))


def _to_float32_odd(v: Tensor) -> Tensor:
    """float64 → float32 rounded to odd: truncate toward zero, set the last bit if inexact. A value rounded
    to odd with ≥ 2 more bits than the target rounds to nearest-even exactly like the original (Boldo &
    Melquiond 2008), so float64 → odd float32 → torch cast is a single correct rounding."""
    y = v.to(torch.float32)
    yd = y.to(torch.float64)
    bits = y.view(torch.int32)
    # inexact with an even last bit: step one ulp to the odd neighbour on the truncated side (an odd RNE
    # result already is that neighbour); on sign-magnitude bits "toward zero" is −1 whatever the sign
    fix = (yd != v) & ((bits & 1) == 0) & torch.isfinite(v)
    step = torch.where(yd.abs() > v.abs(), -1, 1).to(torch.int32)
    return torch.where(fix, bits + step, bits).view(torch.float32)


def _round_native(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Round-to-nearest-even through torch's own cast (fast path, same results as the generic one)."""
    if x.dtype == torch.float64 and dtype != torch.float32:
        x = _to_float32_odd(x)
    return x.to(dtype).to(torch.float32)


def round_to(x: Tensor, fmt: str | Format, mode: str = "nearest",
             generator: torch.Generator | None = None) -> Tensor:
    """Round every element of the float tensor ``x`` to ``fmt`` (see the module docstring).

    Returns a tensor of ``x``'s dtype (float32 or float64) holding representable values. ``mode`` is
    ``"nearest"`` (ties to even) or ``"stochastic"`` (needs no generator, but pass a seeded
    ``torch.Generator`` for reproducible draws).
    """
    fmt = get_format(fmt)
    if mode not in ROUNDING_MODES:
        raise ValueError(f"round_to: mode must be one of {ROUNDING_MODES}, got {mode!r}")
    if not x.is_floating_point():
        raise TypeError(f"round_to: expected a floating-point tensor, got dtype {x.dtype}")
    out_dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    if mode == "nearest" and isinstance(fmt, FloatFormat) and fmt.torch_dtype is not None:
        return _round_native(x, fmt.torch_dtype).to(out_dtype)
    v = x.to(torch.float64)
    if isinstance(fmt, IntFormat):
        q = torch.full_like(v, fmt.scale)
    else:
        _, e = torch.frexp(v)  # v = m·2^e with 0.5 ≤ |m| < 1, so the leading bit is 2^(e−1)
        q = _exp2(torch.clamp(e - 1, min=fmt.emin) - fmt.mbits)
    s = v / q  # exact: q is a power of two (or the int scale, where v/scale is itself rounded)
    if mode == "nearest":
        r = torch.round(s)  # half to even
    else:
        u = torch.rand(s.shape, generator=generator, dtype=torch.float64, device=s.device)
        r = torch.floor(s + u)
    out = r * q
    if isinstance(fmt, IntFormat):
        out = torch.clamp(out, fmt.min, fmt.max)
        out = torch.where(torch.isinf(v), torch.where(v > 0, fmt.max, fmt.min), out)
    else:
        over = out.abs() > fmt.max
        top = fmt.max if fmt.saturate else math.inf
        big = torch.where(v > 0, top, -top)
        out = torch.where(over | torch.isinf(v), big.to(out.dtype), out)
    out = torch.where(torch.isnan(v), v, out)
    return out.to(out_dtype)
