"""Shared cases of the row-norm tests: every (kind, norm) with small options, and one call of the public function
for a kind with a chosen ``impl``."""

import torch

import normmatters as nm

NORMS = ("l2", "l1", "linf", "topk", "range")
KINDS = ("layer", "rms", "group")
#: the estimator options each norm is tested with (range: two chunks where the row length allows)
OPTIONS = {"topk": {"k": 3}, "range": {"chunks": 2}}


def options(norm, n):
    """The tested options, shrunk to fit rows of n elements (k ≤ n; two chunks of ≥ 2 elements or none)."""
    opts = dict(OPTIONS.get(norm, {}))
    if "k" in opts:
        opts["k"] = min(opts["k"], n)
    if opts.get("chunks") and (n % opts["chunks"] or n // opts["chunks"] < 2):
        opts["chunks"] = None
    return opts


def make(kind, shape, dtype=torch.float64, affine=True, seed=0):
    """(x, params) for ``kind``: layer / rms x (R, n) with per-element weight (and bias); group x (N, C, S) with
    2 groups and per-channel weight and bias."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)
    size = shape[1] if kind == "group" else shape[-1]
    if not affine:
        return x, ()
    w = (torch.rand(size, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    b = torch.randn(size, generator=g, dtype=torch.float64).to(dtype)
    return x, ((w,) if kind == "rms" else (w, b))


def call(kind, x, params, norm, impl, eps=1e-5, **opts):
    n = x.shape[-1] if kind != "group" else x[0].numel() // 2
    opts = {**options(norm, n), **opts}
    if kind == "layer":
        w, b = params or (None, None)
        return nm.lp_layer_norm(x, x.shape[-1], w, b, eps=eps, norm=norm, impl=impl, **opts)
    if kind == "rms":
        (w,) = params or (None,)
        return nm.lp_rms_norm(x, x.shape[-1], w, eps=eps, norm=norm, impl=impl, **opts)
    w, b = params or (None, None)
    return nm.lp_group_norm(x, 2, w, b, eps=eps, norm=norm, impl=impl, **opts)


def outputs_and_grads(kind, x, params, norm, impl, **opts):
    """y and the gradients of a fixed random projection of y w.r.t. x and the parameters (in float64)."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, *params)]
    y = call(kind, leaves[0], tuple(leaves[1:]), norm, impl, **opts)
    proj = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(y.dtype)
    grads = torch.autograd.grad((y * proj).sum(), leaves)
    return [y.double()] + [g.double() for g in grads]
