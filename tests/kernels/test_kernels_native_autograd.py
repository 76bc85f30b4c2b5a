"""The per-layer native plan (normmatters.kernels.native_autograd.NativePlan, kept by LpBatchNorm): a layer that
reuses its plan gives exactly what a layer that rebuilds it every step gives, and every change the plan depends
on (options, tensors, their data, the input's layout, $NORMMATTERS_KERNEL, eval mode, copies) makes a new one or
none."""

import copy
import io
import pickle
import warnings

import pytest
import torch

import normmatters as nm
from normmatters.kernels import native, native_autograd

# the native kernels' autograd Functions and plans run CPU operators: CPU whatever the test device
pytestmark = pytest.mark.cpu_only


@pytest.fixture(autouse=True)
def _need_native():
    if not native.available():
        pytest.skip("native kernels unavailable (no C compiler)")


class _NoPlan(nm.LpBatchNorm2d):
    """The same layer with the plan dropped before every call: the path every step took before plans."""

    def forward(self, input):
        self._kernels.plan = None
        return super().forward(input)


def _train(layer, xs, gs):
    outs = []
    for x0, g in zip(xs, gs):
        x = x0.clone().requires_grad_()
        y = layer(x)
        y.backward(g)
        outs.append((y.detach().clone(), x.grad.clone()))
    return outs


@pytest.mark.parametrize("norm", ["l1", "range", "linf", "topk", "l2", "mean"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_reused_plan_equals_rebuilt_plan(norm, layout):
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    xs = [(torch.randn(8, 6, 5, 7) * 2 + 1).contiguous(memory_format=fmt) for _ in range(4)]
    gs = [torch.randn(8, 6, 5, 7) for _ in range(4)]
    a = nm.LpBatchNorm2d(6, norm=norm, impl="native", momentum=0.3)
    b = _NoPlan(6, norm=norm, impl="native", momentum=0.3)
    with torch.no_grad():
        for m in (a, b):
            m.weight.copy_(torch.linspace(0.5, 2.0, 6))
            m.bias.copy_(torch.linspace(-1.0, 1.0, 6))
    out_a, out_b = _train(a, xs, gs), _train(b, xs, gs)
    assert isinstance(a._plan, native_autograd.NativePlan)
    for (ya, ga), (yb, gb) in zip(out_a, out_b):
        torch.testing.assert_close(ya, yb, rtol=0, atol=0)
        torch.testing.assert_close(ga, gb, rtol=0, atol=0)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0)
    torch.testing.assert_close(a.weight.grad, b.weight.grad, rtol=0, atol=0)
    assert int(a.num_batches_tracked) == 4


def _step(m, x0):
    x = x0.clone().requires_grad_()
    y = m(x)
    y.sum().backward()
    return y


def test_plan_is_built_once_and_reused():
    m = nm.LpBatchNorm2d(4, norm="range")
    x = torch.randn(8, 4, 6, 6)
    _step(m, x)
    plan = m._plan
    assert isinstance(plan, native_autograd.NativePlan)
    _step(m, x)
    assert m._plan is plan


@pytest.mark.parametrize("change", [
    lambda m: setattr(m, "eps", 1e-3),
    lambda m: setattr(m, "momentum", 0.5),
    lambda m: setattr(m, "norm", "l1"),
    lambda m: setattr(m, "nonfinite", "raise"),
    lambda m: setattr(m, "impl", "compiled"),
    lambda m: setattr(m, "weight", torch.nn.Parameter(torch.full((4,), 2.0))),
    lambda m: m.register_buffer("running_mean", torch.full((4,), 3.0)),
    lambda m: m.train(False),
    lambda m: m.double(),
    lambda m: setattr(m.weight, "data", torch.full((4,), 2.0)),
], ids=["eps", "momentum", "norm", "nonfinite", "impl", "weight", "register_buffer", "eval", "double", "data"])
def test_every_change_is_seen(change):
    """After the change the layer computes exactly what a fresh layer in the same state computes."""
    x = torch.randn(8, 4, 6, 6)
    m = nm.LpBatchNorm2d(4, norm="range", momentum=0.1)
    _step(m, x)
    assert m._plan is not None
    change(m)
    fresh = copy.deepcopy(m)  # no plan travels with a copy
    assert fresh._plan is None
    xd = x.to(m.weight.dtype)
    y, y_ref = _step(m, xd), _step(fresh, xd)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(m.running_mean, fresh.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(m.running_var, fresh.running_var, rtol=0, atol=0)


def test_weight_data_of_another_dtype_is_not_read_as_the_old_one():
    m = nm.LpBatchNorm2d(4, norm="l1")
    x = torch.randn(8, 4, 6, 6, dtype=torch.float64)
    m.double()
    _step(m, x)
    m.weight.data = torch.full((4,), 2.0)  # float32 data in a float64 layer: not eligible for the native kernels
    with torch.no_grad():
        y = m(x.clone())
    m2 = nm.LpBatchNorm2d(4, norm="l1").double()
    m2.weight.data = torch.full((4,), 2.0)
    torch.testing.assert_close(y, m2(x.clone()), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("other", [
    lambda x: x[:4],                                            # another batch size
    lambda x: x.contiguous(memory_format=torch.channels_last),  # another layout
    lambda x: x.double(),                                       # another dtype (layer stays float32: reference)
])
def test_another_input_makes_another_plan(other):
    m = nm.LpBatchNorm2d(4, norm="linf")
    x = torch.randn(8, 4, 6, 6)
    _step(m, x)
    first = m._plan
    x2 = other(x)
    ref = copy.deepcopy(m)
    y = _step(m, x2)
    torch.testing.assert_close(y, _step(ref, x2), rtol=0, atol=0)
    assert m._plan is not first


def test_environment_is_read_once_until_an_option_is_assigned(monkeypatch):
    """impl=None resolves $NORMMATTERS_KERNEL at the layer's first call and keeps the choice; assigning an
    option (here impl itself) makes the layer decide afresh."""
    monkeypatch.delenv("NORMMATTERS_KERNEL", raising=False)
    m = nm.LpBatchNorm2d(4, norm="l1")
    x = torch.randn(8, 4, 6, 6)
    assert type(_step(m, x).grad_fn).__name__ == "NativeBatchNormFunctionBackward"
    assert m._plan is not None
    monkeypatch.setenv("NORMMATTERS_KERNEL", "reference")
    assert type(_step(m, x).grad_fn).__name__ == "NativeBatchNormFunctionBackward"  # decided already
    m.impl = None
    assert type(_step(m, x).grad_fn).__name__ != "NativeBatchNormFunctionBackward"
    assert m._plan is None
    monkeypatch.setenv("NORMMATTERS_KERNEL", "native")
    m.impl = None
    assert type(_step(m, x).grad_fn).__name__ == "NativeBatchNormFunctionBackward"
    plan = m._plan
    _step(m, x)
    assert m._plan is plan


def test_explicit_impl_ignores_the_environment(monkeypatch):
    monkeypatch.delenv("NORMMATTERS_KERNEL", raising=False)
    m = nm.LpBatchNorm2d(4, norm="l1", impl="native")
    x = torch.randn(8, 4, 6, 6)
    _step(m, x)
    plan = m._plan
    monkeypatch.setenv("NORMMATTERS_KERNEL", "reference")
    assert type(_step(m, x).grad_fn).__name__ == "NativeBatchNormFunctionBackward"
    assert m._plan is plan


def test_no_plan_for_cumulative_momentum_ghost_batches_or_no_affine():
    x = torch.randn(8, 4, 6, 6)
    for m in (nm.LpBatchNorm2d(4, momentum=None), nm.LpBatchNorm2d(4, ghost_batch_size=4),
              nm.LpBatchNorm2d(4, affine=False)):
        _step(m, x)
        assert m._plan is None, m


def test_cumulative_momentum_still_updates_every_step():
    m = nm.LpBatchNorm2d(4, norm="l1", momentum=None)
    xs = [torch.randn(8, 4, 6, 6) + i for i in range(3)]
    for x in xs:
        _step(m, x)
    torch.testing.assert_close(m.running_mean, torch.stack([x.mean((0, 2, 3)) for x in xs]).mean(0),
                               rtol=1e-5, atol=1e-5)


def test_pickle_and_state_dict_carry_no_plan():
    m = nm.LpBatchNorm2d(4, norm="range")
    x = torch.randn(8, 4, 6, 6)
    _step(m, x)
    assert m._plan is not None
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    m2 = torch.load(buf, weights_only=False)
    assert m2._plan is None
    assert pickle.loads(pickle.dumps(m))._plan is None
    assert set(m.state_dict()) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
    torch.testing.assert_close(_step(m2, x), _step(m, x), rtol=0, atol=0)


def test_load_state_dict_assign_makes_a_new_plan():
    m = nm.LpBatchNorm2d(4, norm="l1")
    x = torch.randn(8, 4, 6, 6)
    _step(m, x)
    sd = {k: v.clone() + (1.0 if v.is_floating_point() else 0) for k, v in m.state_dict().items()}
    m.load_state_dict(sd, assign=True)
    ref = nm.LpBatchNorm2d(4, norm="l1")
    ref.load_state_dict(sd)
    torch.testing.assert_close(_step(m, x), _step(ref, x), rtol=0, atol=0)
    torch.testing.assert_close(m.running_mean, ref.running_mean, rtol=0, atol=0)


def test_inplace_plan_checks_the_weight_every_call():
    m = nm.LpBatchNorm2d(4, norm="l1", inplace=True)
    x = torch.randn(8, 4, 6, 6)
    for _ in range(2):
        _step(m, torch.nn.functional.relu(x.clone().requires_grad_()) + 0.0)  # a non-leaf input
    assert m._plan is not None
    with torch.no_grad():
        m.weight[1] = 0.0  # in place: same tensor, same address — the plan stays, the check still runs
    with pytest.raises(ValueError, match="inplace=True needs every weight != 0"):
        m(x.clone().requires_grad_() * 1.0)


def test_nonfinite_batch_raises_through_the_plan():
    m = nm.LpBatchNorm2d(4, norm="l1", nonfinite="raise")
    x = torch.randn(8, 4, 6, 6)
    _step(m, x)
    before = m.running_mean.clone()
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(nm.NonFiniteBatchError, match=r"LpBatchNorm2d\(4, norm='l1'\)"):
        m(bad)
    torch.testing.assert_close(m.running_mean, before, rtol=0, atol=0)


def test_compiled_model_does_not_use_the_plan():
    m = nm.LpBatchNorm2d(4, norm="l1")
    x = torch.randn(8, 4, 6, 6)
    _step(m, x)  # eager step: builds a plan
    compiled = torch.compile(m, fullgraph=True, dynamic=False)
    y = compiled(x)
    ref = copy.deepcopy(m)
    ref.impl = "reference"
    torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["weight", "bias", "running_mean", "running_var"])
def test_wrongly_sized_channel_vector_is_a_clear_error(name):
    """The kernels read and write C entries of each: a shorter tensor must stop before the call, naming it."""
    m = nm.LpBatchNorm2d(4, norm="l1")
    x = torch.randn(8, 4, 6, 6)
    _step(m, x)  # with a plan: the .data change below must still be caught
    getattr(m, name).data = torch.ones(2)
    with pytest.raises(ValueError, match=rf"LpBatchNorm2d\(4, norm='l1'\): expected {name} of shape \(4,\)"):
        m(x.clone())
    with pytest.raises(ValueError, match=r"expected weight of shape \(4,\).*got \(2,\)"):
        nm.kernels.lean_batch_norm(x, None, None, torch.ones(2), torch.zeros(2), training=True, impl="native")


class _Positive(torch.nn.Module):
    def forward(self, w):
        return w.abs() + 0.5


@pytest.mark.parametrize("when", ["before", "after"])
def test_parametrized_weight(when):
    """torch.nn.utils.parametrize removes `weight` from _parameters (through __delattr__) and computes a new
    tensor on every access: every step must use it, as a fresh layer does."""
    from torch.nn.utils import parametrize

    x = torch.randn(8, 4, 6, 6)
    m = nm.LpBatchNorm2d(4, norm="l1")
    if when == "after":
        _step(m, x)
    parametrize.register_parametrization(m, "weight", _Positive())
    ref = nm.LpBatchNorm2d(4, norm="l1", impl="reference")
    ref.load_state_dict(m.state_dict(), strict=False)
    parametrize.register_parametrization(ref, "weight", _Positive())
    with torch.no_grad():
        m.parametrizations.weight.original.copy_(torch.linspace(-2, 2, 4))
        ref.parametrizations.weight.original.copy_(torch.linspace(-2, 2, 4))
    for _ in range(3):
        torch.testing.assert_close(_step(m, x), _step(ref, x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.parametrizations.weight.original.grad, ref.parametrizations.weight.original.grad,
                               rtol=1e-4, atol=1e-4)


def test_deleted_buffer_is_the_usual_error():
    m = nm.LpBatchNorm2d(4, norm="l1")
    x = torch.randn(8, 4, 6, 6)
    _step(m, x)
    del m.running_mean
    with pytest.raises(AttributeError, match="running_mean"):
        m(x)
    assert m._plan is None  # (the plan saw the buffer gone and was dropped)


@pytest.mark.parametrize("change", [
    lambda m, flat: setattr(m.weight, "data", flat[::2]),          # same address, another stride
    lambda m, flat: setattr(m.running_mean, "data", flat[::2]),
    lambda m, flat: m.running_mean.data.unsqueeze_(0),              # same address, another shape
    lambda m, flat: setattr(m.weight, "data", m.weight.data[:2]),   # same address, fewer entries
], ids=["weight-stride", "buffer-stride", "buffer-shape", "weight-size"])
def test_tensor_of_another_layout_at_the_same_address(change):
    """The plan compares each tensor's shape, strides and dtype (not only its identity): a strided or resized
    tensor at the same address must give what a fresh layer gives (its result or its error), and nothing
    outside the tensor may be written."""
    flat = torch.arange(1.0, 9.0)
    m = nm.LpBatchNorm2d(4, norm="l1")
    m.weight.data = flat[:4]
    m.running_mean.data = flat[:4].clone() * 0
    x = torch.randn(8, 4, 6, 6)
    _step(m, x)
    change(m, flat)
    fresh = copy.deepcopy(m)
    before = flat.clone()
    try:
        expected = _step(fresh, x)
    except (ValueError, RuntimeError) as err:
        with pytest.raises(type(err)):
            _step(m, x)
        return
    flat.copy_(before)
    # a copy's tensors are contiguous again, so it may take another kernel than m: equal within rounding
    torch.testing.assert_close(_step(m, x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.running_mean, fresh.running_mean, rtol=1e-5, atol=1e-5)
    outside = torch.ones(8, dtype=torch.bool)
    outside[::2] = False  # the entries the strided tensors do not cover, for the stride cases
    if m.weight.stride() == (2,) or m.running_mean.stride() == (2,):
        torch.testing.assert_close(flat[outside], before[outside], rtol=0, atol=0)


def test_tensor_momentum_is_read_every_step():
    x = torch.randn(8, 4, 6, 6)
    m = nm.LpBatchNorm2d(4, norm="l1", momentum=torch.tensor(0.1))
    _step(m, x)
    m.momentum.fill_(0.9)
    fresh = copy.deepcopy(m)
    _step(m, x + 3)
    _step(fresh, x + 3)
    torch.testing.assert_close(m.running_mean, fresh.running_mean, rtol=0, atol=0)


def test_skip_counts_every_skipped_batch_across_plan_steps_silently():
    """"skip" (the default) warns nothing and counts each skipped batch — from the step that builds the plan
    and from the later steps that reuse it — without touching the buffers."""
    m = nm.LpBatchNorm2d(4, norm="l1")
    bad = torch.randn(8, 4, 6, 6)
    bad[0, 0, 0, 0] = float("nan")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(3):
            m(bad.clone())
    assert not [w for w in rec if issubclass(w.category, RuntimeWarning)]
    assert m._plan is not None and m.skipped_batches == 3 and int(m.num_batches_tracked) == 0
    assert int(m.num_batches_tracked) == 0
