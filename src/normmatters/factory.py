"""``norm_layer``: a name → layer-constructor factory for ``norm_layer=`` arguments of model builders.

Like timm's ``create_norm_layer`` / torchvision's ``norm_layer`` convention: the returned callable takes
``num_features`` (plus any keyword a builder passes) and returns a module.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from torch import nn

from .estimators import available_norms, get_estimator
from .nn.batchnorm import LpBatchNorm1d, LpBatchNorm2d, LpBatchNorm3d

__all__ = ["norm_layer", "TORCH_BATCHNORM_NAMES"]

#: names that select the stock ``nn.BatchNorm`` (the baseline every experiment compares against)
TORCH_BATCHNORM_NAMES = ("bn", "batchnorm", "torch")
_LP = {1: LpBatchNorm1d, 2: LpBatchNorm2d, 3: LpBatchNorm3d}
_TORCH = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def norm_layer(norm: str | Callable[..., nn.Module] = "l1", dim: int = 2,
               **options: Any) -> Callable[..., nn.Module]:
    """A constructor ``f(num_features, **kw) -> nn.Module`` for the named normalization.

    Args:
        norm: an estimator name ("l2", "l1", "linf", "topk", "range", "mean"), one of
            ``TORCH_BATCHNORM_NAMES`` for ``nn.BatchNorm{dim}d``, "none" for ``nn.Identity``, or a callable
            (returned unchanged, with ``options`` bound).
        dim: 1, 2 or 3 — which ``*BatchNorm{dim}d`` to build.
        **options: keyword arguments bound into every layer (e.g. ``k=5``, ``ghost_batch_size=32``).

    The result is a ``functools.partial`` and so picklable.
    """
    if callable(norm):
        return functools.partial(norm, **options) if options else norm
    if dim not in _LP:
        raise ValueError(f"norm_layer: dim must be 1, 2 or 3, got {dim!r}")
    if not isinstance(norm, str):
        raise TypeError(f"norm_layer: norm must be a name or a callable, got {type(norm).__name__}")
    key = norm.lower()
    if key in TORCH_BATCHNORM_NAMES:
        return functools.partial(_TORCH[dim], **options)
    if key == "none":
        return _identity
    if key not in available_norms():
        get_estimator(key)  # raises the registry's error with the list of names
    return functools.partial(_LP[dim], norm=key, **options)


def _identity(num_features: int, **_: Any) -> nn.Module:
    return nn.Identity()
