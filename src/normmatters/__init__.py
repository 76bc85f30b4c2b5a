"""normmatters: cheaper, low-precision-safe, Gaussian-consistent normalization for PyTorch.

Public API (re-exports only); see README.md for a tour.
"""

from . import constants, estimators, functional
from .convert import convert_batchnorm, to_torch_batchnorm
from .estimators import available_norms, get_estimator
from .factory import norm_layer
from .functional import NonFiniteBatchError, lp_batch_norm
from .nn import *  # noqa: F401,F403
from .nn import __all__ as _nn_all

__version__ = "0.1.0"

__all__ = [
    "constants", "estimators", "functional",
    "convert_batchnorm", "to_torch_batchnorm", "norm_layer",
    "available_norms", "get_estimator", "lp_batch_norm", "NonFiniteBatchError",
    *_nn_all,
]
