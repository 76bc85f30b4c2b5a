"""Fast paths of the Lp batch-norm layers: lean autograd Functions, compiled variants and the dispatch.

See :mod:`.lean` (dispatch, autograd Function), :mod:`.formulas` (the math) and :mod:`.compiled`.
"""

from .lean import (
    IMPLS,
    LeanBatchNormFunction,
    LeanBatchNormInplaceFunction,
    gaussian_constant,
    lean_batch_norm,
    resolve_impl,
)

__all__ = ["IMPLS", "LeanBatchNormFunction", "LeanBatchNormInplaceFunction", "gaussian_constant", "lean_batch_norm",
           "resolve_impl"]
