"""Shared helpers of the Triton kernels' tests: a layer with ``impl="triton"`` on the test device against the same
layer with ``impl="reference"`` on the CPU — output, every gradient, every buffer."""

from __future__ import annotations

import torch


def close(a, b, tol, what):
    assert a is not None and b is not None, what
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    assert torch.allclose(a, b, atol=tol, rtol=tol), f"{what}: max |diff| {(a - b).abs().max().item():.3g}"


def against_reference(make, shape, device, dtype=torch.float32, layout=None, tol=1e-4, steps=2, scale=3.0):
    """Run ``make(impl)`` layers — "reference" on the CPU, "triton" on ``device`` — for ``steps`` training steps
    (the running buffers evolve) on the same random input; compare outputs, input and parameter gradients and the
    state_dict after each step."""
    ref, tri = make("reference"), make("triton").to(device)
    with torch.no_grad():
        for p in ref.parameters():
            p.uniform_(0.5, 1.5)
    tri.load_state_dict(ref.state_dict())
    for step in range(steps):
        x = torch.randn(*shape) * scale + 1
        x = x.to(dtype)
        if layout is not None:
            x = x.contiguous(memory_format=layout)
        xr = x.clone().requires_grad_()
        xt = x.to(device).requires_grad_()
        if layout is not None:
            xt = x.to(device).contiguous(memory_format=layout).detach().requires_grad_()
        yr, yt = ref(xr), tri(xt)
        name = f"{type(tri).__name__}({tri.extra_repr()}) {tuple(shape)} {dtype} {layout} step {step}"
        close(yr, yt, tol, name + " output")
        g = torch.randn_like(yr)
        gr = torch.autograd.grad(yr, [xr, *ref.parameters()], g)
        gt = torch.autograd.grad(yt, [xt, *tri.parameters()], g.to(device))
        for i, (a, b) in enumerate(zip(gr, gt)):
            close(a, b, tol * 10, name + f" grad {i}")
        sr, st = ref.state_dict(), tri.state_dict()
        assert sr.keys() == st.keys()
        for key in sr:
            close(sr[key], st[key], tol, name + " " + key)
    return tri
