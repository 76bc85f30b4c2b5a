"""The batch-statistics Triton kernels (normmatters.kernels.triton.batch_norm) through the layers, against
impl="reference": every norm of the registry, contiguous and channels-last, bfloat16, ghost batches, range chunks,
1d input, the cumulative momentum, the split reduction's combination, the running-statistics update with non-finite
and unrepresentable batches (no host read), and a float64 gradcheck."""

import pytest
import torch
from triton_cases import against_reference, close

import normmatters as nm
from normmatters.estimators import available_norms, get_estimator
from normmatters.functional import NONFINITE, STORED, UNREPRESENTABLE

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


def test_one_split_and_many(device, monkeypatch):
    """The split reduction's combination (Chan's moments, extremes, top-k merge) is exact for any split count."""
    from normmatters.kernels.triton import batch_norm as tbn
    for splits in (1, 3):
        monkeypatch.setattr(tbn, "SPLIT_OVERRIDE", splits)
        for norm in ("l2", "linf", "topk"):
            against_reference(lambda impl, norm=norm: nm.LpBatchNorm1d(4, norm=norm, impl=impl, **_kw(norm)),
                              (9, 4), device, steps=1)


def test_topk_beyond_the_bound_falls_back(device):
    from normmatters.kernels.triton import TOPK_MAX
    against_reference(lambda impl: nm.LpBatchNorm1d(2, norm="topk", k=TOPK_MAX + 1, impl=impl), (24, 2), device,
                      steps=1)


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


def test_layer_skips_a_nonfinite_batch(device):
    layer = nm.LpBatchNorm2d(3, norm="l1", impl="triton", nonfinite="skip").to(device)
    x = torch.randn(4, 3, 2, 2, device=device)
    x[0, 1, 0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        layer(x)
    assert layer.num_batches_tracked.item() == 0
    assert layer.running_mean.tolist() == [0.0] * 3 and layer.running_var.tolist() == [1.0] * 3


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


def test_3d_channels_last_a_sliced_input_and_a_strided_gradient(device):
    against_reference(lambda impl: nm.LpBatchNorm3d(3, norm="l1", impl=impl), (4, 3, 2, 2, 2), device,
                      layout=torch.channels_last_3d, steps=1)
    ref, tri = nm.LpBatchNorm2d(3, norm="range", impl="reference"), nm.LpBatchNorm2d(3, norm="range", impl="triton")
    tri = tri.to(device)
    x = torch.randn(8, 3, 4, 4)[::2, :, 1:3]  # not dense: read through a contiguous copy
    g = torch.randn(4, 3, 4, 2).transpose(2, 3)  # a gradient of other strides than the input's
    xr, xt = x.clone().requires_grad_(), x.to(device).requires_grad_()
    yr, yt = ref(xr), tri(xt)
    close(yr, yt, 1e-5, "output")
    close(torch.autograd.grad(yr, xr, g)[0], torch.autograd.grad(yt, xt, g.to(device))[0], 1e-4, "input gradient")
