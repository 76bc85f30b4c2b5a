"""The nn.BatchNorm contract of torch 2.13, row by row (issue: "the whole nn.BatchNorm contract ... no NaN or
overflow at the edges"), checked against ``nn.BatchNorm*d`` itself across impls and layouts."""

import warnings

import pytest
import torch
from torch import nn

import normmatters as nm
from normmatters.nn import LpBatchNorm1d, LpBatchNorm2d, LpBatchNorm3d

NORMS = ["l2", "l1", "linf", "topk", "range", "mean"]
IMPLS = ["native", "compiled", "eager", "reference"]
# (layout name, shape, lp class, torch class, memory format)
LAYOUTS = [
    ("contiguous", (8, 4, 5, 5), LpBatchNorm2d, nn.BatchNorm2d, torch.contiguous_format),
    ("channels_last", (8, 4, 5, 5), LpBatchNorm2d, nn.BatchNorm2d, torch.channels_last),
    ("NC", (64, 4), LpBatchNorm1d, nn.BatchNorm1d, torch.contiguous_format),
]


def _layout(shape, fmt, dtype=torch.float32, scale=1.0):
    x = torch.randn(*shape, dtype=torch.float64) * scale
    x = x.to(dtype)
    return x.contiguous(memory_format=fmt) if x.dim() == 4 else x


# --- row 1: keyword-only bias=False -------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", LAYOUTS, ids=[lay[0] for lay in LAYOUTS])
def test_bias_false_matches_nn_batchnorm(impl, layout, device):
    # ours on the test device, nn.BatchNorm on the CPU
    _, shape, lp_cls, torch_cls, fmt = layout
    ref = torch_cls(4, bias=False)
    m = lp_cls(4, norm="l2", bias=False, impl=impl, device=device)
    assert m.bias is None and isinstance(m.weight, nn.Parameter)
    assert set(m.state_dict()) == set(ref.state_dict())
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
    m.load_state_dict(ref.state_dict())
    for _ in range(2):
        x = _layout(shape, fmt)
        xa, xb = x.clone().requires_grad_(), x.to(device).clone().requires_grad_()
        g = torch.randn_like(x)
        ref(xa).backward(g)
        m(xb).backward(g.to(device))
        torch.testing.assert_close(xb.grad.cpu(), xa.grad, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(m.weight.grad.cpu(), ref.weight.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(m.running_mean.cpu(), ref.running_mean)
    torch.testing.assert_close(m.running_var.cpu(), ref.running_var)
    assert "bias=False" in repr(m)
    with pytest.raises(TypeError):
        LpBatchNorm2d(4, "l2", 1e-5, 0.1, True, True, 10, None, None, "raise", None, None, None, None, False, False)


def test_convert_keeps_bias_free_layers_bias_free_both_ways():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, bias=False), nn.BatchNorm2d(4))
    keys = set(model.state_dict())
    nm.convert_batchnorm(model, norm="l1")
    assert isinstance(model[1], LpBatchNorm2d) and model[1].bias is None and model[2].bias is not None
    assert set(model.state_dict()) == keys
    nm.to_torch_batchnorm(model)
    assert type(model[1]) is nn.BatchNorm2d and model[1].bias is None and model[2].bias is not None
    assert set(model.state_dict()) == keys


# --- row 2: empty batch ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("shape,lp_cls,torch_cls", [
    ((0, 5, 2, 2), LpBatchNorm2d, nn.BatchNorm2d), ((3, 5, 0, 2), LpBatchNorm2d, nn.BatchNorm2d),
    ((0, 5), LpBatchNorm1d, nn.BatchNorm1d), ((0, 5, 2, 2, 2), LpBatchNorm3d, nn.BatchNorm3d)])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_empty_batch_matches_nn_batchnorm(impl, norm, shape, lp_cls, torch_cls, momentum):
    ref = torch_cls(5, momentum=momentum)
    m = lp_cls(5, norm=norm, impl=impl, momentum=momentum)
    for layer in (ref, m):
        layer.running_mean.fill_(2.0)
        layer.running_var.fill_(3.0)
    xa = torch.randn(*shape, requires_grad=True)
    xb = torch.randn(*shape, requires_grad=True)
    ya, yb = ref(xa), m(xb)
    assert yb.shape == ya.shape and yb.dtype == ya.dtype
    ya.sum().backward()
    yb.sum().backward()
    assert xb.grad.shape == xb.shape
    torch.testing.assert_close(m.weight.grad, ref.weight.grad)
    torch.testing.assert_close(m.bias.grad, ref.bias.grad)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(m, name), getattr(ref, name))


def test_empty_batch_functional_and_inplace():
    rm, rv, nbt = torch.zeros(3), torch.ones(3), torch.tensor(0)
    y = nm.lp_batch_norm(torch.randn(0, 3, 4), rm, rv, training=True, norm="l1", num_batches_tracked=nbt)
    assert y.shape == (0, 3, 4) and int(nbt) == 1
    m = LpBatchNorm2d(3, norm="l1", inplace=True)
    assert m(torch.randn(0, 3, 2, 2)).shape == (0, 3, 2, 2) and int(m.num_batches_tracked) == 1


# --- row 3: eps rules -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("eps", [0.0, -1.0])
def test_eps_must_be_positive_in_training(impl, norm, eps):
    m = LpBatchNorm2d(4, norm=norm, eps=eps, impl=impl)  # accepted at construction, as nn.BatchNorm2d
    with pytest.raises(ValueError, match=rf"LpBatchNorm2d\(4, norm='{norm}'\): batch_norm eps must be positive "
                                         rf"during training, but got {eps}"):
        m(torch.randn(2, 4, 3, 3))
    assert int(m.num_batches_tracked) == 0
    with pytest.raises(ValueError, match="eps must be positive"):
        nm.lp_batch_norm(torch.randn(2, 4, 3), None, None, training=True, eps=eps, norm=norm)


def test_eps_zero_accepted_in_eval_and_negative_refused():
    ref = nn.BatchNorm2d(4, eps=0.0).eval()
    m = LpBatchNorm2d(4, norm="l2", eps=0.0).eval()
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(m(x), ref(x))
    with pytest.raises(ValueError, match="batch_norm eps must be non-negative, but got -1.0"):
        LpBatchNorm2d(4, norm="l2", eps=-1.0).eval()(x)


# --- row 4: zero-dispersion channel --------------------------------------------------------------------------

DTYPES = [(torch.float32, 1e-4), (torch.float64, 1e-10), (torch.bfloat16, 3e-2)]


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", LAYOUTS, ids=[lay[0] for lay in LAYOUTS])
@pytest.mark.parametrize("dtype,tol", DTYPES, ids=["fp32", "fp64", "bf16"])
def test_zero_dispersion_channel(inplace, impl, layout, dtype, tol, device):
    _, shape, lp_cls, torch_cls, fmt = layout
    x = _layout(shape, fmt, dtype)
    x[:, 2] = 0.5
    x[:, 3] = 0.0
    g = torch.randn_like(x)
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    ref = torch_cls(4, dtype=pdtype)
    xa = x.clone().requires_grad_()
    ref(xa).backward(g)
    for norm in NORMS:
        m = lp_cls(4, norm=norm, impl=impl, inplace=inplace, dtype=pdtype, device=device)
        xb = x.to(device).clone().requires_grad_()  # on the test device; nn.BatchNorm (ref) on the CPU
        y = m(xb * 1 if inplace else xb)  # in place: a non-leaf input
        y.backward(g.to(device))
        assert torch.isfinite(y).all() and torch.isfinite(xb.grad).all(), norm
        assert torch.isfinite(m.weight.grad).all() and torch.isfinite(m.running_var).all(), norm
        if norm == "l2":
            torch.testing.assert_close(xb.grad.float().cpu(), xa.grad.float(), atol=tol, rtol=tol)
        else:  # the limit: a constant channel's gradient is w·r·(g − mean g), r = 1/sqrt(eps) (mean-only: 1)
            gc = g[:, 2].double()
            want = (gc - gc.mean()) / (1.0 if norm == "mean" else 1e-5 ** 0.5)
            torch.testing.assert_close(xb.grad[:, 2].double().cpu(), want, atol=tol * 400, rtol=tol)


# --- row 5: |x| ~ 1e20 -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("layout", LAYOUTS, ids=[lay[0] for lay in LAYOUTS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_huge_input_right_output_and_buffers_never_inf(impl, norm, layout, dtype, device):
    # on the test device, against the reference on the CPU in float64
    _, shape, lp_cls, _, fmt = layout
    x = _layout(shape, fmt, dtype, scale=1e20)
    m = lp_cls(4, norm=norm, impl=impl, device=device)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    xb = x.to(device).clone().requires_grad_()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = m(xb)
        y.backward(torch.randn_like(y))
    ref = lp_cls(4, norm=norm, impl="reference", dtype=torch.float64)(x.double() / 1e20)
    scale = 1e20 if norm == "mean" else 1.0  # mean-only: y = w·(x − μ) + b scales with x
    tol = 0.05 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(y.double().cpu() / scale, ref, atol=tol, rtol=tol)
    assert torch.isfinite(xb.grad).all() and torch.isfinite(m.weight.grad).all()
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    if norm == "mean":  # no running variance: the mean (~1e19) fits and is tracked
        assert int(m.num_batches_tracked) == 1 and not msgs
    else:  # σ̂²·n/(n−1) ~ 1e40 does not fit a float32 buffer: every buffer unchanged, the batch counted, silently
        for k, v in m.state_dict().items():
            torch.testing.assert_close(v, before[k])
        assert not msgs and m.skipped_batches == 1
    m(_layout(shape, fmt, dtype).to(device))  # the next ordinary batch trains normally
    assert torch.isfinite(m.running_var).all() and torch.isfinite(m.running_mean).all()


def test_huge_input_float64_buffers_hold_it():
    m = LpBatchNorm2d(4, norm="l1", dtype=torch.float64)
    x = torch.randn(8, 4, 5, 5) * 1e20  # float32 input, float64 buffers: σ̂² ~ 1e40 fits
    m(x)
    assert int(m.num_batches_tracked) == 1 and (m.running_var > 1e38).all() and torch.isfinite(m.running_var).all()


# --- row 6: in-place refusal before any write -------------------------------------------------------------------

def _nograd_view():
    a = torch.randn(4, 4, 3, 3, requires_grad=True) * 1
    with torch.no_grad():
        return a[:]


def _inference():
    with torch.inference_mode():
        return torch.randn(4, 4, 3, 3)


REFUSED = {
    "leaf requiring grad": lambda: torch.randn(4, 4, 3, 3, requires_grad=True),
    "view of such a leaf": lambda: torch.randn(4, 4, 3, 3, requires_grad=True)[:],
    "multi-output view": lambda: (torch.randn(2, 4, 4, 3, 3, requires_grad=True) * 1).unbind(0)[0],
    "view made under no_grad": _nograd_view,
    "inference tensor": _inference,
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(REFUSED))
def test_inplace_refuses_before_any_write(impl, case):
    m = LpBatchNorm2d(4, norm="l1", inplace=True, impl=impl)
    x = REFUSED[case]()
    before, state = x.detach().clone(), {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"LpBatchNorm2d\(4, norm='l1'\): inplace=True cannot overwrite"):
        m(x)
    assert torch.equal(x.detach(), before)
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), k
    # what the check refuses, autograd refuses too: the same write by a plain in-place op fails
    with pytest.raises(RuntimeError):
        REFUSED[case]().mul_(torch.ones(1, requires_grad=True))


@pytest.mark.parametrize("impl", IMPLS)
def test_inplace_accepts_what_autograd_accepts(impl):
    m = LpBatchNorm2d(4, norm="l1", inplace=True, impl=impl)
    leaf = torch.randn(4, 4, 3, 3, requires_grad=True)
    x = leaf * 1
    y = m(x)
    assert y is x
    y.sum().backward()
    assert torch.isfinite(leaf.grad).all() and int(m.num_batches_tracked) == 1
    with torch.no_grad():
        m(torch.randn(4, 4, 3, 3, requires_grad=True))  # no grad mode: a leaf may be overwritten


# --- row 7: meta device, fake tensors, torch.export -------------------------------------------------------------

@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("inplace", [False, True])
def test_meta_and_fake_tensors(norm, inplace):
    m = LpBatchNorm2d(4, norm=norm, device="meta", inplace=inplace)
    assert m(torch.randn(2, 4, 3, 3, device="meta")).shape == (2, 4, 3, 3)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        m = LpBatchNorm2d(4, norm=norm, inplace=inplace)
        x = torch.randn(2, 4, 3, 3)
        assert m(x).shape == (2, 4, 3, 3) and m.eval()(x).shape == (2, 4, 3, 3)
    m = LpBatchNorm2d(4, norm=norm).train()  # the constant cache holds no fake tensor afterwards
    assert torch.isfinite(m(torch.randn(2, 4, 3, 3))).all()


def test_export_in_training_mode():
    m = LpBatchNorm2d(4, norm="l1").train()
    ep = torch.export.export(m, (torch.randn(2, 4, 3, 3),))
    assert ep is not None


# --- rows 8-11: jit.script, option assignment, skip warnings, track_running_stats=False --------------------------

def test_jit_script_says_unsupported_and_what_to_use():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), LpBatchNorm2d(4))
    with pytest.raises(RuntimeError, match=r"torch.jit.script is not supported.*torch.compile.*torch.export"):
        torch.jit.script(model)


@pytest.mark.parametrize("name,value", [
    ("momentum", 5.0), ("momentum", -0.1), ("momentum", "0.1"), ("eps", "x"), ("eps", float("nan")),
    ("norm", "l7"), ("k", 0), ("chunks", 2), ("ghost_batch_size", 0), ("nonfinite", "warn"), ("impl", "gpu"),
    ("inplace", 1), ("precision", "fp12")])
def test_options_validated_on_assignment(name, value):
    m = LpBatchNorm2d(4, norm="l1")
    with pytest.raises(ValueError, match="LpBatchNorm2d"):
        setattr(m, name, value)
    m.momentum = None
    m.eps = 1e-3
    m.norm = "range"
    m.chunks = 2
    with pytest.raises(ValueError, match="chunks is an option of norm='range' only"):
        m.norm = "l1"
    m(torch.randn(4, 4, 3, 3))


def test_skip_is_silent_and_counts_per_layer():
    a, b = LpBatchNorm2d(4), LpBatchNorm2d(4)  # the default: nonfinite="skip"; same description
    x = torch.randn(2, 4, 3, 3)
    x[0, 0, 0, 0] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            a(x)
            b(x)
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert a.skipped_batches == 3 and b.skipped_batches == 3
    assert int(a.num_batches_tracked) == 0 and int(b.num_batches_tracked) == 0


def test_unrepresentable_variance_warns_once_per_layer_in_raise_mode():
    a, b = LpBatchNorm2d(4, nonfinite="raise"), LpBatchNorm2d(4, nonfinite="raise")  # same description
    x = torch.randn(2, 4, 3, 3) * 1e20  # finite, but σ̂² ~ 1e40 does not fit a float32 buffer
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(3):
            a(x)
            b(x)
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 2 and all("the batch's running variance" in m for m in msgs)
    assert a.skipped_batches == 3 and int(a.num_batches_tracked) == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_nonfinite_message_without_buffers(impl):
    x = torch.randn(2, 4, 3, 3)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(nm.NonFiniteBatchError) as err:
        LpBatchNorm2d(4, track_running_stats=False, impl=impl, nonfinite="raise")(x)
    assert "track_running_stats=False" in str(err.value) and "running_mean" not in str(err.value)
    with pytest.raises(nm.NonFiniteBatchError, match="running_mean, running_var and num_batches_tracked were left"):
        LpBatchNorm2d(4, impl=impl, nonfinite="raise")(x)
