import importlib.util
import os
import sys

import pytest
import torch
from hypothesis import settings

from devices import ENV, DeviceUnavailable, resolve

# CI runs the property tests with a fixed derivation of their examples (the same draws every run, so a red CI is
# reproducible and never a coin toss); locally they draw fresh examples each run, which is how they find new cases
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", f"cpu_only: CPU-only by nature (native C++ kernels, their build, the CPU buffer pool): runs on "
        f"the CPU; skipped, with this reason, when ${ENV} picks another device")
    try:
        config._normmatters_device = resolve()
    except (DeviceUnavailable, ValueError) as exc:
        raise pytest.UsageError(str(exc)) from None
    # The Triton kernels' tests (tests/kernels/triton) run under Triton's interpreter on a CPU test device. Triton
    # fixes interpreted vs compiled when it defines a kernel (its standard library's too), so the variable must be
    # set before anything imports Triton — other test modules (the integrations', Inductor's) import it at
    # collection. Inductor's CPU code does not use Triton, so nothing else changes.
    if config._normmatters_device.type == "cpu" and importlib.util.find_spec("triton") is not None:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise pytest.UsageError("triton was imported before tests/conftest.py could set TRITON_INTERPRET=1; "
                                    "run with TRITON_INTERPRET=1 set")
        os.environ["TRITON_INTERPRET"] = "1"


def pytest_collection_modifyitems(config, items):
    dev = config._normmatters_device
    if dev.type == "cpu":
        return
    skip = pytest.mark.skip(reason=f"cpu_only: runs on the CPU only; the test device is {dev} "
                            f"(run again with {ENV}=cpu for these)")
    for item in items:
        if item.get_closest_marker("cpu_only") is not None:
            item.add_marker(skip)


def pytest_report_header(config):
    return f"normmatters test device: {config._normmatters_device} (${ENV})"


@pytest.fixture(scope="session")
def device(pytestconfig) -> torch.device:
    """The device the correctness tests run their path under test on (tests/devices.py)."""
    return pytestconfig._normmatters_device


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
