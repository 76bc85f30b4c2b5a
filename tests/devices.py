"""The device the correctness tests run on, and how they compare with the CPU reference.

``NORMMATTERS_TEST_DEVICE``: ``cpu`` (the default where CUDA is absent), ``cuda`` or ``cuda:N`` (the default,
``cuda``, where ``torch.cuda.is_available()`` and the variable is unset). Tests that take the ``device`` fixture
(tests/conftest.py) run the path under test on that device and compare its results, moved to the CPU, with the
reference computed on the CPU (in float64 where the test says so). Tests marked ``cpu_only`` (the native C++
kernels, their operator build, the CPU buffer pool) run on the CPU and are skipped, with that reason, when the
test device is not the CPU: run the suite once more with ``NORMMATTERS_TEST_DEVICE=cpu`` for them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

ENV = "NORMMATTERS_TEST_DEVICE"


class DeviceUnavailable(RuntimeError):
    """NORMMATTERS_TEST_DEVICE names a device this machine cannot run."""


def resolve(env: Mapping[str, str] | None = None, cuda_available: bool | None = None) -> torch.device:
    """The test device from ``env`` (default ``os.environ``): its $NORMMATTERS_TEST_DEVICE, else cuda where
    available, else cpu. Raises :class:`DeviceUnavailable` for a CUDA device without CUDA, ``ValueError`` for
    anything but cpu / cuda / cuda:N."""
    env = os.environ if env is None else env
    has_cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    raw = env.get(ENV, "").strip().lower()
    if not raw:
        return torch.device("cuda" if has_cuda else "cpu")
    try:
        dev = torch.device(raw)
    except RuntimeError as exc:
        raise ValueError(f"{ENV}={raw!r}: expected cpu, cuda or cuda:N") from exc
    if dev.type not in ("cpu", "cuda") or (dev.type == "cpu" and dev.index not in (None, 0)):
        raise ValueError(f"{ENV}={raw!r}: expected cpu, cuda or cuda:N, got device type {dev.type!r}")
    if dev.type == "cuda":
        if not has_cuda:
            raise DeviceUnavailable(
                f"{ENV}={raw!r} asks for the GPU, but torch.cuda.is_available() is False here (torch "
                f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}): run on a CUDA machine with a "
                f"CUDA build of torch, or set {ENV}=cpu")
        count = torch.cuda.device_count() if cuda_available is None else 1
        if dev.index is not None and dev.index >= count:
            raise DeviceUnavailable(f"{ENV}={raw!r}: this machine has {count} CUDA device(s)")
    return dev
