"""The test device (tests/devices.py): NORMMATTERS_TEST_DEVICE, the CUDA default and the errors."""

import pytest
import torch

from devices import ENV, DeviceUnavailable, resolve


@pytest.mark.parametrize("value,cuda,want", [("", False, "cpu"), ("", True, "cuda"), ("cpu", True, "cpu"),
                                             (" CUDA ", True, "cuda"), ("cuda:0", True, "cuda:0")])
def test_resolve(value, cuda, want):
    env = {ENV: value} if value else {}
    assert resolve(env, cuda_available=cuda) == torch.device(want)


def test_cuda_asked_but_absent_is_a_clear_error():
    with pytest.raises(DeviceUnavailable, match=rf"{ENV}='cuda' asks for the GPU, but torch.cuda.is_available\(\) "
                                                rf"is False here .* or set {ENV}=cpu"):
        resolve({ENV: "cuda"}, cuda_available=False)


@pytest.mark.parametrize("value", ["gpu", "meta", "cuda:x"])
def test_other_values_are_refused(value):
    with pytest.raises(ValueError, match=rf"{ENV}=.*expected cpu, cuda or cuda:N"):
        resolve({ENV: value}, cuda_available=True)


def test_the_session_device_is_the_resolved_one(device):
    assert device == resolve()
