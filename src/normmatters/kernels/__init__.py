"""Fast paths of the Lp batch-norm layers: the one dispatch, lean autograd Functions, compiled and native kernels.

See :mod:`.dispatch` (which path runs: reference, eager, compiled, native, emulated; ``lean_batch_norm``;
``$NORMMATTERS_KERNEL``), :mod:`.lean` (the autograd Functions), :mod:`.formulas` (the math), :mod:`.compiled`,
:mod:`.native` and :mod:`.pool` (the native outputs' buffer cache; :func:`empty_cache` releases its idle buffers).
"""

from .dispatch import ENV, IMPLS, lean_batch_norm, resolve_impl
from .lean import LeanBatchNormFunction, LeanBatchNormInplaceFunction, gaussian_constant
from .pool import empty_cache

__all__ = ["ENV", "IMPLS", "LeanBatchNormFunction", "LeanBatchNormInplaceFunction", "empty_cache",
           "gaussian_constant", "lean_batch_norm", "resolve_impl"]
