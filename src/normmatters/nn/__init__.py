"""Modules: Lp batch norm (1d/2d/3d, per-norm aliases, synced across processes), Lp layer / RMS / group / instance norm,
the adapted layers of model-zoo norm classes and (bounded) weight norm parametrizations."""

from . import adapted, batchnorm, instancenorm, layernorm, sync, weightnorm
from .adapted import *  # noqa: F401,F403
from .batchnorm import *  # noqa: F401,F403
from .instancenorm import *  # noqa: F401,F403
from .layernorm import *  # noqa: F401,F403
from .sync import *  # noqa: F401,F403
from .weightnorm import *  # noqa: F401,F403

__all__ = [*adapted.__all__, *batchnorm.__all__, *instancenorm.__all__, *layernorm.__all__, *sync.__all__,
           *weightnorm.__all__]
