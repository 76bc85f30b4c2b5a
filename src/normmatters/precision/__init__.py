"""Low-precision numerics for normalization: number formats, an arithmetic emulator, a stability sweep.

* :mod:`.formats` — fp32, bf16, fp16, fp8 e4m3fn / e5m2, signed fixed point; nearest-even and stochastic
  rounding, bit-exact with torch's casts.
* :mod:`.emulate` — the normalization computation with every intermediate rounded, events per step, and
  :func:`emulated_lp_batch_norm`, the layer path behind ``precision=``.
* :mod:`.per_sample` — the same emulation for ``LpLayerNorm`` / ``LpRMSNorm`` / ``LpGroupNorm`` (rows = samples).
* :mod:`.sweep` — the stability map (``normmatters precision``).
"""

from .formats import FORMATS, FloatFormat, Format, IntFormat, get_format, int_format, round_to

__all__ = ["FORMATS", "Format", "FloatFormat", "IntFormat", "get_format", "int_format", "round_to"]
