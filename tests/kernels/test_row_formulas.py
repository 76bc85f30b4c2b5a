"""The row formulas (eager, op by op) and their autograd Function: agreement with the reference path, float64
gradcheck for every norm and kind, the lean-layout views, and what backward saves."""

import pytest
import torch
from row_cases import KINDS, NORMS, call, make, outputs_and_grads

from normmatters.kernels import row_formulas
from normmatters.kernels.row_norm import RowNormFunction

SHAPES = {"layer": (3, 8), "rms": (3, 8), "group": (2, 4, 3)}


@pytest.mark.parametrize("m", [1, 2, 4])
def test_lean_view_round_trip(m):
    t = torch.randn(5, 8)
    t5 = row_formulas.to_lean(t, m)
    assert t5.shape == (1, m, 1, 5, 8 // m)
    assert torch.equal(t5[0, 1 % m, 0, 3], t[3, (1 % m) * (8 // m):(1 % m + 1) * (8 // m)])
    assert torch.equal(row_formulas.from_lean(t5, 5, 8), t)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("norm", NORMS)
def test_gradcheck(kind, norm):
    x, params = make(kind, SHAPES[kind])
    inputs = tuple(t.clone().requires_grad_() for t in (x, *params))
    assert torch.autograd.gradcheck(lambda x, *p: call(kind, x, p, norm, "eager"), inputs)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("affine", [True, False])
def test_matches_reference(kind, norm, affine):
    x, params = make(kind, (4, 6, 5) if kind == "group" else (7, 19), affine=affine)
    ref = outputs_and_grads(kind, x, params, norm, "reference")
    for a, b in zip(outputs_and_grads(kind, x, params, norm, "eager"), ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("norm", NORMS)
def test_saves_input_weight_and_row_statistics(norm):
    x, (w, b) = make("layer", (6, 16))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        RowNormFunction.apply(x.requires_grad_(), w, b, 1.0, 1e-5, norm, True, 3, 1, 1, 1, "eager")
    big = [t for t in saved if t.numel() > 16]
    assert len(big) == 1 and big[0].shape == (6, 16)  # the input only: no activation-sized intermediate
    rows = [t for t in saved if t.numel() == 6]
    assert len(rows) == (3 if norm == "topk" else 2)  # μ, raw (and top-k's threshold)
