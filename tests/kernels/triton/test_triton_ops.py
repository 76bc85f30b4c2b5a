"""torch.library.opcheck on every normmatters_triton:: operator (schema, fake tensor, autograd registration, AOT
dispatch) with representative inputs."""

import pytest
import torch

from normmatters.estimators import get_estimator


@pytest.fixture(scope="module")
def ops():
    from normmatters.kernels.triton import ops
    return ops


def _check(op, args):
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("norm,chunks", [("l1", 0), ("range", 2)])
def test_batch_norm_ops(ops, norm, chunks, device):
    x = torch.randn(4, 3, 2, device=device, requires_grad=True)
    w = torch.rand(3, device=device, requires_grad=True)
    b = torch.randn(3, device=device, requires_grad=True)
    c = get_estimator(norm).constant(8, k=2, chunks=chunks or None)
    _check(ops.bn_fwd, (x, w, b, c, 1e-5, norm, 2, 1, chunks))
    y, mean, raw, aux = ops.bn_fwd(x, w, b, c, 1e-5, norm, 2, 1, chunks)
    _check(ops.bn_bwd, (torch.randn_like(y), x.detach(), w.detach(), mean, raw, aux, c, 1e-5, norm, 2, 1, chunks))


def test_update_op(ops, device):
    mean, raw = torch.randn(2, 3, device=device), torch.rand(2, 3, device=device)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    nbt, skipped = torch.zeros((), dtype=torch.long, device=device), torch.zeros((), dtype=torch.long, device=device)
    _check(ops.bn_update, (mean, raw, rm, rv, nbt, skipped, 1.2, 0.1, None, 8))
    _check(ops.bn_update, (mean, None, rm, None, None, None, 1.0, 0.0, torch.tensor(0.5, device=device), 8))


@pytest.mark.parametrize("norm,centered,groups,spatial", [("linf", True, 1, 1), ("range", False, 2, 3)])
def test_row_ops(ops, norm, centered, groups, spatial, device):
    x = torch.randn(4, 6, device=device, requires_grad=True)
    width = groups * 6 // spatial
    w = torch.rand(width, device=device, requires_grad=True)
    b = torch.randn(width, device=device, requires_grad=True)
    c = get_estimator(norm).constant(6, centered=centered)
    _check(ops.row_fwd, (x, w, b, c, 1e-5, norm, centered, 2, 0, groups, spatial))
    y, mean, raw, aux = ops.row_fwd(x, w, b, c, 1e-5, norm, centered, 2, 0, groups, spatial)
    _check(ops.row_bwd, (torch.randn_like(y), x.detach(), w.detach(), mean, raw, aux, c, 1e-5, norm, centered, 2, 0,
                         groups, spatial))
