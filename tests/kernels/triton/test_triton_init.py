"""The entry points of normmatters.kernels.triton: what they cover, the fallback beyond it, the error off the GPU,
the skipped-batch counter, and a training step that reads nothing back to the host."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from triton_cases import against_reference

import normmatters as nm
from normmatters.functional import NONFINITE
from normmatters.kernels import triton as tk
from normmatters.options import BatchNormTensors, NormOptions


def test_covers_the_registry_norms_up_to_the_topk_bound():
    assert tk.covers("l1", 10) and tk.covers("mean", 10) and tk.covers("topk", tk.TOPK_MAX)
    assert not tk.covers("topk", tk.TOPK_MAX + 1) and not tk.covers("nonexistent", 1)


def test_cpu_tensor_without_the_interpreter_is_an_error_naming_the_layer(monkeypatch):
    from normmatters.kernels.triton import ops
    monkeypatch.setattr(ops, "INTERPRET", False)
    x = torch.randn(4, 3, 2, 2)
    with pytest.raises(ValueError, match=r"LpBatchNorm2d\(3, norm='l1'\): impl='triton' runs on CUDA tensors"):
        nm.LpBatchNorm2d(3, impl="triton")(x)
    with pytest.raises(ValueError, match="LpLayerNorm: impl='triton' runs on CUDA"):
        nm.LpLayerNorm(2, impl="triton")(x)
    nm.LpBatchNorm2d(3, impl="auto")(x)  # "auto" does not pick Triton there


def test_inplace_falls_back_to_the_composite_path(device):
    def make(impl):
        return nm.LpBatchNorm2d(3, norm="l1", impl=impl, inplace=impl == "triton")

    layer = make("triton").to(device)
    x = torch.randn(4, 3, 2, 2, device=device)
    ref = make("reference").to(device)
    expect = ref(x.clone())
    assert torch.allclose(layer(x), expect.to(device), atol=1e-5)


def test_skipped_counter_and_status(device):
    x = torch.randn(4, 3, device=device)
    x[1, 2] = float("nan")
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    nbt, skipped = torch.zeros((), dtype=torch.long, device=device), torch.zeros((), dtype=torch.long, device=device)
    y, status = tk.batch_norm_training(x, BatchNormTensors(None, None, rm, rv, nbt), NormOptions(norm="linf"), 0.1,
                                       "here", skipped=skipped)
    assert status.item() == NONFINITE and skipped.item() == 1 and nbt.item() == 0 and rm.abs().sum().item() == 0


class _HostReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
                    torch.ops.aten.item.default):
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_a_training_step_reads_nothing_back(device):
    bn = nm.LpBatchNorm2d(3, norm="range", impl="triton", nonfinite="ignore", momentum=None).to(device)
    ln = nm.LpLayerNorm(6, norm="topk", k=2, impl="triton").to(device)
    x = torch.randn(4, 3, 2, 6, device=device, requires_grad=True)
    with _HostReads() as h:
        ln(bn(x)).sum().backward()
    assert h.count == 0


def test_sync_layer_in_one_process(device):
    against_reference(lambda impl: nm.SyncLpBatchNorm2d(3, norm="l1", impl=impl), (4, 3, 2, 2), device, steps=1)


def test_compile_and_export_see_the_ops(device):
    """torch.compile (aot_eager) of a layer on the Triton path matches the reference, buffers included, and
    torch.export keeps the normmatters_triton:: operator in its graph."""
    def make(impl):
        return nm.LpBatchNorm2d(3, norm="l1", impl=impl)

    ref, tri = make("reference"), make("triton").to(device)
    x = torch.randn(4, 3, 2, 2)
    y = torch.compile(tri, backend="aot_eager")(x.to(device))
    assert torch.allclose(y.cpu(), ref(x), atol=1e-5)
    assert torch.allclose(tri.running_var.cpu(), ref.running_var, atol=1e-6) and tri.num_batches_tracked.item() == 1
    layer = nm.LpLayerNorm(6, norm="l1", impl="triton").to(device)
    ep = torch.export.export(layer, (torch.randn(4, 6, device=device),))
    assert "normmatters_triton.row_fwd.default" in {str(n.target) for n in ep.graph.nodes}


def test_dispatch_path_names_the_choice(device):
    from normmatters.kernels import dispatch
    x = torch.randn(4, 3, 2, 2, device=device)
    assert dispatch.path(x, NormOptions(impl="triton"), True) == "triton"
    assert dispatch.path(x, NormOptions(impl="triton", norm="topk", k=tk.TOPK_MAX + 1), True) == "eager"
    assert dispatch.path(x, NormOptions(impl="triton", inplace=True), True) == "eager"
    assert (dispatch.path(x, NormOptions(impl="auto"), True) == "triton") == (device.type == "cuda")
