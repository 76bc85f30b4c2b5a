"""The ``impl`` switch and ``$NORMMATTERS_KERNEL``, importable from here as before; they live in :mod:`.dispatch`."""

from .dispatch import ENV, IMPLS, resolve_impl

__all__ = ["IMPLS", "ENV", "resolve_impl"]
