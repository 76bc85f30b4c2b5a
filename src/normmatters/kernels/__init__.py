"""Fast paths of the Lp batch-norm layers: lean autograd Functions, compiled variants and the dispatch.

See :mod:`.lean` (dispatch, autograd Function), :mod:`.formulas` (the math), :mod:`.compiled`, :mod:`.native`
and :mod:`.pool` (the native outputs' buffer cache; :func:`empty_cache` releases its idle buffers).
"""

from .lean import (
    IMPLS,
    LeanBatchNormFunction,
    LeanBatchNormInplaceFunction,
    gaussian_constant,
    lean_batch_norm,
    resolve_impl,
)
from .pool import empty_cache

__all__ = ["IMPLS", "LeanBatchNormFunction", "LeanBatchNormInplaceFunction", "empty_cache", "gaussian_constant",
           "lean_batch_norm", "resolve_impl"]
