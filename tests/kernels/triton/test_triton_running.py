"""The running-statistics update kernel (normmatters.kernels.triton.running): the reference's update, every buffer
kept on a non-finite or unrepresentable batch, the skipped counter, the status — on the device, no host read."""

import pytest
import torch
from triton_cases import close

from normmatters.functional import NONFINITE, STORED, UNREPRESENTABLE


def _update(mean, raw, rm, rv, nbt, skipped, momentum=0.1, n=8):
    from normmatters.kernels.triton import ops
    return ops.bn_update(mean, raw, rm, rv, nbt, skipped, 1.0, momentum, None, n)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_statistics_keep_every_buffer(bad, device):
    dev = device
    mean = torch.tensor([[0.5, bad]], device=dev)
    raw = torch.ones(1, 2, device=dev)
    rm, rv = torch.zeros(2, device=dev), torch.ones(2, device=dev)
    nbt, skipped = torch.zeros((), dtype=torch.long, device=dev), torch.zeros((), dtype=torch.long, device=dev)
    status = _update(mean, raw, rm, rv, nbt, skipped)
    assert status.item() == NONFINITE and skipped.item() == 1 and nbt.item() == 0
    assert rm.tolist() == [0.0, 0.0] and rv.tolist() == [1.0, 1.0]
    status = _update(mean.nan_to_num(0.0, 0.0, 0.0), raw, rm, rv, nbt, skipped)
    assert status.item() == STORED and skipped.item() == 1 and nbt.item() == 1
    close(rm, torch.tensor([0.05, 0.0]), 1e-7, "running_mean")
    close(rv, torch.tensor([1.0 + 0.1 * (8 / 7 - 1.0)] * 2), 1e-6, "running_var (Bessel n/(n-1))")


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # (numpy, in the interpreter: σ̂²)
def test_unrepresentable_variance_keeps_every_buffer(device):
    mean = torch.zeros(1, 2, device=device)
    raw = torch.full((1, 2), 1e20, device=device)  # finite σ̂, but σ̂² overflows float32
    rm, rv = torch.zeros(2, device=device), torch.ones(2, device=device)
    nbt = torch.zeros((), dtype=torch.long, device=device)
    assert _update(mean, raw, rm, rv, nbt, None).item() == UNREPRESENTABLE
    assert rv.tolist() == [1.0, 1.0] and nbt.item() == 0


@pytest.mark.parametrize("divides", [True, False])
def test_matches_the_reference_update(divides, device):
    from normmatters.functional import update_running_stats
    from normmatters.kernels.triton.running import update_running
    mean, raw, c, mom = torch.randn(2, 3), torch.rand(2, 3), 1.3, torch.tensor(0.25)
    bufs = [torch.randn(3), torch.rand(3) + 0.5, torch.tensor(4)]
    ref, got = [b.clone() for b in bufs], [b.to(device) for b in bufs]
    st_ref = update_running_stats(mean, c * raw if divides else None, ref[0], ref[1], ref[2], mom, 10)
    st = update_running(mean.to(device), raw.to(device) if divides else None, got[0], got[1] if divides else None,
                        got[2], None, c, mom.to(device), 10)
    assert st.item() == st_ref.item() == STORED
    for a, b, name in zip(ref, got, ("running_mean", "running_var", "num_batches_tracked")):
        close(a, b, 1e-6, name)
