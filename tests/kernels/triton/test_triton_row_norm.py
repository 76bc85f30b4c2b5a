"""The per-sample Triton kernels (normmatters.kernels.triton.row_norm) through LpLayerNorm / LpRMSNorm /
LpGroupNorm, against impl="reference": every dividing norm of the registry, affine and not, bfloat16, range chunks,
and a float64 gradcheck."""

import pytest
import torch
from triton_cases import against_reference

import normmatters as nm
from normmatters.estimators import available_norms, get_estimator

NORMS = [n for n in available_norms() if get_estimator(n).divides]


def _kw(norm):
    return {"k": 3} if "k" in get_estimator(norm).options else {}


@pytest.mark.parametrize("norm", NORMS)
def test_layers_match_reference(norm, device):
    kw = _kw(norm)
    against_reference(lambda impl: nm.LpLayerNorm((2, 6), norm=norm, impl=impl, **kw), (5, 2, 6), device, steps=1)
    against_reference(lambda impl: nm.LpRMSNorm(12, norm=norm, impl=impl, **kw), (5, 12), device, steps=1)
    against_reference(lambda impl: nm.LpGroupNorm(2, 4, norm=norm, impl=impl, **kw), (3, 4, 3), device, steps=1)


def test_without_affine_bf16_and_chunks(device):
    against_reference(lambda impl: nm.LpLayerNorm(8, norm="l1", elementwise_affine=False, impl=impl), (4, 8), device,
                      steps=1)
    against_reference(lambda impl: nm.LpLayerNorm(16, norm="l2", impl=impl), (4, 16), device, dtype=torch.bfloat16,
                      tol=3e-2, steps=1)
    against_reference(lambda impl: nm.LpRMSNorm(16, norm="range", chunks=4, impl=impl), (3, 16), device, steps=1)
    against_reference(lambda impl: nm.LpGroupNorm(2, 4, norm="range", chunks=2, impl=impl), (2, 4, 3), device,
                      steps=1)


@pytest.mark.parametrize("norm,centered", [("l1", True), ("topk", False), ("range", True)])
def test_float64_gradcheck(norm, centered, device):
    from normmatters.kernels.triton import ops
    c = get_estimator(norm).constant(8, k=3, centered=centered)
    x = torch.randn(3, 8, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.rand(8, dtype=torch.float64, device=device).add(0.5).requires_grad_()
    b = torch.randn(8, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: ops.row_fwd(x, w, b, c, 1e-5, norm, centered, 3, 0, 1, 1)[0], (x, w, b), fast_mode=True)
