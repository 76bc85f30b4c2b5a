import pytest
import torch

from devices import ENV, DeviceUnavailable, resolve


def pytest_configure(config):
    config.addinivalue_line(
        "markers", f"cpu_only: CPU-only by nature (native C++ kernels, their build, the CPU buffer pool): runs on "
        f"the CPU; skipped, with this reason, when ${ENV} picks another device")
    try:
        config._normmatters_device = resolve()
    except (DeviceUnavailable, ValueError) as exc:
        raise pytest.UsageError(str(exc)) from None


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
