"""The synced statistics (normmatters.kernels.sync) in one process, on the test device: with the collectives of a
world of one stood in for, sync_lp_batch_norm is lp_batch_norm (values, gradients, running buffers; float64
gradcheck), and the traffic it records is the README's table (bytes per rank per layer per step). Two and three
real gloo ranks: tests/nn/test_sync.py."""

import pytest
import torch

from normmatters.functional import lp_batch_norm
from normmatters.kernels import sync

NORMS = ["l2", "l1", "linf", "topk", "range", "mean"]
K = 3


@pytest.fixture
def world_of_one(monkeypatch):
    """torch.distributed's collectives for one rank: all_gather copies, all_reduce keeps."""
    def all_gather(out, t, group=None):
        assert len(out) == 1
        out[0].copy_(t)

    monkeypatch.setattr(sync.dist, "all_gather", all_gather)
    monkeypatch.setattr(sync.dist, "all_reduce", lambda t, group=None: None)


@pytest.mark.parametrize("norm", NORMS)
def test_one_rank_is_lp_batch_norm(norm, device, world_of_one):
    x = torch.randn(6, 4, 3, 5, dtype=torch.float64) * 2 + 1
    w, b = torch.rand(4, dtype=torch.float64) + 0.5, torch.randn(4, dtype=torch.float64)
    g = torch.randn_like(x)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    ref_rm, ref_rv = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    y_ref = lp_batch_norm(leaves[0], ref_rm, ref_rv, *leaves[1:], True, 0.1, 1e-5, norm, K)
    grads_ref = torch.autograd.grad(y_ref, leaves, g)
    rm, rv = torch.zeros(4, dtype=torch.float64, device=device), torch.ones(4, dtype=torch.float64, device=device)
    nbt = torch.zeros((), dtype=torch.long, device=device)
    dl = [t.to(device).requires_grad_() for t in (x, w, b)]
    y = sync.sync_lp_batch_norm(dl[0], rm, rv, dl[1], dl[2], 0.1, 1e-5, norm, K, num_batches_tracked=nbt)
    assert y.device == dl[0].device and y.dtype == x.dtype
    torch.testing.assert_close(y.detach().cpu(), y_ref.detach(), rtol=1e-10, atol=1e-10)
    for a, r in zip(torch.autograd.grad(y, dl, g.to(device)), grads_ref, strict=True):
        torch.testing.assert_close(a.cpu(), r, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(rm.cpu(), ref_rm, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(rv.cpu(), ref_rv, rtol=1e-10, atol=1e-12)
    assert nbt.item() == 1


@pytest.mark.parametrize("norm", ["l1", "linf", "topk"])
def test_gradcheck_float64(norm, device, world_of_one):
    x = (torch.randn(4, 2, 3, dtype=torch.float64, device=device) * 2).requires_grad_()
    w = (torch.rand(2, dtype=torch.float64, device=device) + 0.5).requires_grad_()
    b = torch.randn(2, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: sync.sync_lp_batch_norm(x, None, None, w, b, 0.1, 1e-5, norm, K), (x, w, b))


#: bytes per rank per layer per step, float32, C channels, k of topk (the README's table)
TRAFFIC = {"mean": lambda C, k: 16 * C + 8, "l2": lambda C, k: 20 * C + 8, "l1": lambda C, k: 24 * C + 8,
           "linf": lambda C, k: 48 * C + 8, "topk": lambda C, k: (32 + 4 * k) * C + 8,
           "range": lambda C, k: 40 * C + 8}
COLLECTIVES = {"mean": 2, "l2": 3, "l1": 3, "linf": 3, "topk": 4, "range": 3}


@pytest.mark.parametrize("norm", NORMS)
def test_traffic_is_the_documented_table(norm, world_of_one):
    C = 5
    x = torch.randn(8, C, 4, 4, requires_grad=True)
    w = torch.ones(C, requires_grad=True)
    with sync.count_traffic() as t:
        sync.sync_lp_batch_norm(x, None, None, w, None, 0.1, 1e-5, norm, K).sum().backward()
    assert sum(nbytes for *_, nbytes in t.log) == TRAFFIC[norm](C, K)
    assert len(t.log) == COLLECTIVES[norm]
    assert [phase for _, phase, _ in t.log][-1] == "backward" and t.log[0][0] == "all_gather"
    assert sync._TRAFFIC is None  # recording stops with the block


def test_group_size_without_a_process_group_is_one():
    assert sync.group_size(None) == 1


def test_too_few_values_over_the_group_is_an_error(world_of_one):
    with pytest.raises(ValueError, match=r"layer: expected more than 1 value per channel over the process group"):
        sync.sync_lp_batch_norm(torch.randn(1, 3), None, None, None, None, 0.1, 1e-5, "l1", where="layer")
