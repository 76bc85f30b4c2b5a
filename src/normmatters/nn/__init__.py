"""Modules: Lp batch norm (1d/2d/3d and per-norm aliases)."""

from .batchnorm import *  # noqa: F401,F403
from .batchnorm import __all__  # noqa: F401
