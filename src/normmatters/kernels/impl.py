"""Which kernel runs: the ``impl`` switch of the layers and :func:`~normmatters.kernels.lean_batch_norm`, and
its environment variable ``NORMMATTERS_KERNEL`` (see :mod:`.lean` for what each value runs)."""

from __future__ import annotations

import os

__all__ = ["IMPLS", "ENV", "resolve_impl"]

IMPLS = ("auto", "native", "compiled", "eager", "reference")
ENV = "NORMMATTERS_KERNEL"


def resolve_impl(impl: str | None, where: str = "lean_batch_norm") -> str:
    """The kernel to run: ``impl`` if given, else $NORMMATTERS_KERNEL, else "auto"."""
    chosen = impl if impl is not None else os.environ.get(ENV, "auto") or "auto"
    if chosen not in IMPLS:
        src = "impl" if impl is not None else f"${ENV}"
        raise ValueError(f"{where}: {src} must be one of {IMPLS}, got {chosen!r}")
    return chosen
