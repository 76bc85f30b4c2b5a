"""normmatters.kernels.dispatch: the one choice of path (reference | eager | compiled | native | emulated) per
impl, device and input kind; $NORMMATTERS_KERNEL read there only; the per-layer plan cache and what drops it."""

import pathlib
import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import normmatters as nm
from normmatters.functional import BatchNormTensors
from normmatters.kernels import dispatch, native
from normmatters.options import NormOptions

SRC = pathlib.Path(nm.__file__).parent

need_native = pytest.mark.skipif(not native.available(), reason="native kernels unavailable (no C compiler)")


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(dispatch.ENV, raising=False)


def _x(*shape, **kw):
    return torch.randn(*shape, **kw)


@need_native
@pytest.mark.parametrize("impl, shape, cl, expected", [
    ("auto", (8, 4, 16, 16), False, "native"),        # long rows: the channel kernels
    ("auto", (2048, 4, 3, 3), False, "compiled"),     # 36-byte rows, 288 KB: Inductor measured faster
    ("auto", (8, 4, 3, 3), False, "native"),          # the same rows under native.AUTO_SMALL_BYTES
    ("auto", (8, 4, 3, 3), True, "native"),           # channels_last: the rows kernels
    ("native", (8, 4, 3, 3), False, "native"),
    ("compiled", (8, 4, 16, 16), False, "compiled"),
    ("eager", (8, 4, 16, 16), False, "eager"),
    ("reference", (8, 4, 16, 16), False, "reference"),
])
def test_training_path_per_impl_on_cpu(impl, shape, cl, expected):
    x = _x(*shape)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    assert dispatch.path(x, NormOptions(impl=impl), True) == expected


def test_ineligible_inputs_leave_the_native_kernels():
    opts = NormOptions(impl="native")
    assert dispatch.path(_x(8, 4, 6, 6).half(), opts, True) == "compiled"       # no float16 kernels
    assert dispatch.path(_x(8, 4, 6, 6), opts.replace(ghost_batch_size=4), True) == "compiled"
    assert dispatch.path(_x(8, 4, 6, 6), opts.replace(norm="range", chunks=2), True) == "compiled"


def test_eval_emulated_meta_and_fake():
    x = _x(8, 4, 6, 6)
    assert dispatch.path(x, NormOptions(impl="native"), False) == "reference"
    assert dispatch.path(x, NormOptions(inplace=True), False) == "eager"           # input·scale + shift in place
    assert dispatch.path(x, NormOptions(precision="bf16"), True) == "emulated"
    assert dispatch.path(x, NormOptions(precision="bf16"), False) == "reference"
    assert dispatch.path(_x(8, 4, 6, 6, device="meta"), NormOptions(impl="native"), True) == "eager"
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        fake = torch.randn(8, 4, 16, 16)
        assert dispatch.path(fake, NormOptions(impl="compiled"), True) == "eager"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_runs_inductor_not_native():
    x = _x(8, 4, 16, 16, device="cuda")
    assert dispatch.path(x, NormOptions(impl="native"), True) == "compiled"
    assert dispatch.path(x, NormOptions(impl="auto"), True) == "compiled"


@need_native
@pytest.mark.parametrize("impl, grad_fn", [
    ("native", "NativeBatchNormFunctionBackward"), ("compiled", "LeanBatchNormFunctionBackward"),
    ("eager", "LeanBatchNormFunctionBackward"), ("reference", None)])
def test_the_path_named_is_the_path_run(impl, grad_fn):
    x = _x(8, 4, 16, 16, requires_grad=True)
    y = dispatch.batch_norm(x, BatchNormTensors(None, None, None, None, None), NormOptions(impl=impl), True, 0.1,
                            "test")
    name = type(y.grad_fn).__name__
    assert name == grad_fn if grad_fn else "Native" not in name and "Lean" not in name


def test_emulated_path_is_taken_by_layers_and_lean_batch_norm():
    x = _x(8, 4, 6, 6)
    layer = nm.LpBatchNorm2d(4, norm="l1", precision="fp16")
    ref = nm.LpBatchNorm2d(4, norm="l1", precision="fp16")
    assert type(layer(x).grad_fn).__name__ == "_StraightThroughBackward"
    y = nm.kernels.lean_batch_norm(x, ref.running_mean, ref.running_var, ref.weight, ref.bias, training=True,
                                   num_batches_tracked=ref.num_batches_tracked, options=ref.options)
    assert type(y.grad_fn).__name__ == "_StraightThroughBackward"
    torch.testing.assert_close(layer.running_var, ref.running_var, rtol=0, atol=0)


def test_environment_variable_and_explicit_impl(monkeypatch):
    x = _x(8, 4, 16, 16)
    monkeypatch.setenv(dispatch.ENV, "eager")
    assert dispatch.resolve_impl(None) == "eager"
    assert dispatch.path(x, NormOptions(), True) == "eager"
    assert dispatch.path(x, NormOptions(impl="reference"), True) == "reference"  # explicit impl wins
    monkeypatch.setenv(dispatch.ENV, "bogus")
    with pytest.raises(ValueError, match=r"LpBatchNorm2d\(4, norm='l1'\): \$NORMMATTERS_KERNEL must be one of"):
        nm.LpBatchNorm2d(4)(x)


def test_only_dispatch_reads_the_environment_variable():
    readers = [p.relative_to(SRC).as_posix() for p in SRC.rglob("*.py")
               if re.search(r"[\"']NORMMATTERS_KERNEL[\"']", p.read_text())]
    assert readers == ["kernels/dispatch.py"]
    assert nm.kernels.IMPLS == dispatch.IMPLS and nm.kernels.ENV == "NORMMATTERS_KERNEL"
    from normmatters.kernels import impl, lean
    assert impl.resolve_impl is dispatch.resolve_impl and lean.lean_batch_norm is dispatch.lean_batch_norm


first_options = NormOptions()


def _step(m, x0):
    x = x0.clone().requires_grad_()
    y = m(x * 1.0)  # a non-leaf input, which in-place mode accepts
    y.sum().backward()
    return y


@need_native
def test_plan_is_cached_per_layer_and_replayed():
    a, b = nm.LpBatchNorm2d(4, norm="l1"), nm.LpBatchNorm2d(4, norm="l1")
    x = _x(8, 4, 16, 16)
    _step(a, x)
    _step(b, x)
    plan = a._plan
    assert isinstance(plan, dispatch.NativePlan) and b._plan is not plan
    _step(a, x)
    assert a._plan is plan


@need_native
@pytest.mark.parametrize("change", [
    lambda m: setattr(m, "k", 3),                       # any option
    lambda m: setattr(m, "inplace", True),
    lambda m: setattr(m, "ghost_batch_size", 4),
    lambda m: setattr(m, "precision", "bf16"),
    lambda m: setattr(m, "bias", torch.nn.Parameter(torch.ones(4))),   # a parameter
    lambda m: m.register_buffer("running_var", torch.full((4,), 2.0)),  # a buffer
    lambda m: setattr(m, "track_running_stats", False),
], ids=["k", "inplace", "ghost", "precision", "param", "buffer", "track"])
def test_plan_and_options_dropped_on_change(change):
    """Each change makes the next step run what a fresh layer in that state runs, on a new plan or none (an
    option's assignment drops the plan at once; a new tensor is seen by the plan's check on the next call)."""
    m = nm.LpBatchNorm2d(4, norm="l1")
    x = _x(8, 4, 16, 16)
    _step(m, x)
    first = m._plan
    assert first is not None
    change(m)
    y = _step(m, x)
    assert m._plan is not first
    ref = nm.LpBatchNorm2d(4, norm="l1", impl="reference")
    ref.load_state_dict(m.state_dict(), strict=False)
    for name in ("k", "inplace", "ghost_batch_size", "precision", "track_running_stats"):
        setattr(ref, name, getattr(m, name))
    torch.testing.assert_close(y, _step(ref, x), rtol=1e-4, atol=1e-5)
    assert m.options == NormOptions(**{n: getattr(m, n) for n in first_options.as_dict()})


@need_native
def test_no_plan_kept_for_functional_calls_or_eval():
    x = _x(8, 4, 16, 16)
    kernels = dispatch.LayerKernels()
    nbt = torch.zeros((), dtype=torch.long)
    t = BatchNormTensors(torch.ones(4), torch.zeros(4), torch.zeros(4), torch.ones(4), nbt)
    dispatch.batch_norm(x, t, NormOptions(), True, 0.1, "f")  # a function call keeps nothing
    dispatch.batch_norm(x, t, NormOptions(), True, 0.1, "f", kernels)
    assert isinstance(kernels.plan, dispatch.NativePlan) and kernels.impl == "auto"
    dispatch.batch_norm(x, t, NormOptions(), True, torch.tensor(0.1), "f", (tensor_kernels := dispatch.LayerKernels()))
    assert tensor_kernels.plan is None  # a tensor momentum is read afresh: no plan kept
    m = nm.LpBatchNorm2d(4).eval()
    m(x)
    assert m._plan is None


class _HostReads(TorchDispatchMode):
    """Counts the ops that read a tensor's value back to the host (a device synchronisation on a GPU)."""

    READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
             torch.ops.aten.item.default)

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            self.reads.append(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("impl,norm", [(None, "l1"), (None, "range"), ("eager", "l2"), ("eager", "topk"),
                                       ("compiled", "l1"), ("native", "linf")])
@pytest.mark.parametrize("cls", [nm.LpBatchNorm2d, nm.SyncLpBatchNorm2d])
def test_a_training_step_with_default_options_reads_nothing_back(cls, impl, norm, monkeypatch):
    """No host read in a warm training step (fwd+bwd) with default options — a NaN batch included, which is
    skipped on the device and counted; "raise" still raises (it reads the status to do so)."""
    monkeypatch.delenv(dispatch.ENV, raising=False)
    layer = cls(8, norm=norm, **({"impl": impl} if impl else {}))
    x = torch.randn(16, 8, 6, 6, requires_grad=True)
    layer(x).sum().backward()  # warm-up: builds, compiles, caches
    bad = x.detach().clone()
    bad[0, 1, 2, 3] = float("nan")
    with _HostReads() as h:
        layer(x).sum().backward()
        layer(bad)
    assert h.reads == []
    assert layer.skipped_batches == 1 and int(layer.num_batches_tracked) == 2
    layer.nonfinite = "raise"
    with pytest.raises(nm.NonFiniteBatchError):
        layer(bad)
    assert layer.skipped_batches == 2 and int(layer.num_batches_tracked) == 2
