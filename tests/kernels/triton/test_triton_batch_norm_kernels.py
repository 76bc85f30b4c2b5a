"""The batch-statistics kernels' addressing and split reduction (normmatters.kernels.triton.batch_norm_kernels):
one split and several (Chan's moments, extremes, the top-k merge combined exactly), 3d channels-last, a sliced
input, a gradient of other strides."""

import torch
from triton_cases import against_reference, close

import normmatters as nm
from normmatters.estimators import get_estimator


def _kw(norm):
    return {"k": 3} if "k" in get_estimator(norm).options else {}


def test_one_split_and_many(device, monkeypatch):
    """The split reduction's combination (Chan's moments, extremes, top-k merge) is exact for any split count."""
    from normmatters.kernels.triton import batch_norm as tbn
    for splits in (1, 3):
        monkeypatch.setattr(tbn, "SPLIT_OVERRIDE", splits)
        for norm in ("l2", "linf", "topk"):
            against_reference(lambda impl, norm=norm: nm.LpBatchNorm1d(4, norm=norm, impl=impl, **_kw(norm)),
                              (9, 4), device, steps=1)


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
