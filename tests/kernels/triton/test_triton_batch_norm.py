"""The batch-statistics Triton kernels (normmatters.kernels.triton.batch_norm) through the layers, against
impl="reference": every norm of the registry, contiguous and channels-last, bfloat16 and float16, ghost batches,
range chunks, 1d input, the cumulative momentum, top-k beyond the bound, a non-finite batch, a float64 gradcheck."""

import pytest
import torch
from triton_cases import against_reference

import normmatters as nm
from normmatters.estimators import available_norms, get_estimator

NORMS = available_norms()


def _kw(norm):
    return {"k": 3} if "k" in get_estimator(norm).options else {}


@pytest.mark.parametrize("norm", NORMS)
def test_layer_matches_reference(norm, device):
    """2d contiguous with ghost batches, channels-last, and 1d with the cumulative average (momentum=None)."""
    kw = _kw(norm)
    against_reference(lambda impl: nm.LpBatchNorm2d(3, norm=norm, impl=impl, ghost_batch_size=4, **kw),
                      (8, 3, 2, 3), device)
    tri = against_reference(lambda impl: nm.LpBatchNorm2d(3, norm=norm, impl=impl, **kw), (4, 3, 2, 3), device,
                            layout=torch.channels_last, steps=1)
    y = tri(torch.randn(4, 3, 2, 3, device=device).contiguous(memory_format=torch.channels_last))
    assert y.is_contiguous(memory_format=torch.channels_last)  # written in the input's layout, no copy
    against_reference(lambda impl: nm.LpBatchNorm1d(3, norm=norm, impl=impl, momentum=None, **kw), (10, 3), device)


@pytest.mark.parametrize("norm", [n for n in NORMS if get_estimator(n).divides][:2] + ["range"])
def test_bfloat16(norm, device):
    against_reference(lambda impl: nm.LpBatchNorm2d(3, norm=norm, impl=impl, **_kw(norm)), (4, 3, 2, 2), device,
                      dtype=torch.bfloat16, tol=3e-2, steps=1)


@pytest.mark.parametrize("layout", [None, torch.channels_last])
def test_range_chunks_with_ghost_batches(layout, device):
    against_reference(lambda impl: nm.LpBatchNorm2d(3, norm="range", chunks=2, ghost_batch_size=4, impl=impl),
                      (8, 3, 2, 2), device, layout=layout, steps=1)


def test_topk_beyond_the_bound_falls_back(device):
    from normmatters.kernels.triton import TOPK_MAX
    against_reference(lambda impl: nm.LpBatchNorm1d(2, norm="topk", k=TOPK_MAX + 1, impl=impl), (24, 2), device,
                      steps=1)


def test_layer_skips_a_nonfinite_batch(device):
    layer = nm.LpBatchNorm2d(3, norm="l1", impl="triton").to(device)  # the default: skip on the device, counted
    x = torch.randn(4, 3, 2, 2, device=device)
    x[0, 1, 0, 0] = float("nan")
    layer(x)
    assert layer.num_batches_tracked.item() == 0 and layer.skipped_batches == 1
    assert layer.running_mean.tolist() == [0.0] * 3 and layer.running_var.tolist() == [1.0] * 3
    raising = nm.LpBatchNorm2d(3, norm="l1", impl="triton", nonfinite="raise").to(device)
    with pytest.raises(nm.NonFiniteBatchError):
        raising(x)
    assert raising.num_batches_tracked.item() == 0


@pytest.mark.parametrize("norm", ["l1", "range"])
def test_float64_gradcheck(norm, device):
    from normmatters.kernels.triton import ops
    c = get_estimator(norm).constant(6)
    x = torch.randn(6, 2, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.rand(2, dtype=torch.float64, device=device).add(0.5).requires_grad_()
    b = torch.randn(2, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: ops.bn_fwd(x, w, b, c, 1e-5, norm, 3, 1, 0)[0], (x, w, b),
                                    fast_mode=True)


def test_no_affine_no_running_stats_float16(device):
    against_reference(lambda impl: nm.LpBatchNorm2d(3, norm="linf", affine=False, track_running_stats=False,
                                                    impl=impl), (4, 3, 2, 2), device, dtype=torch.float16, tol=3e-3,
                      steps=1)
