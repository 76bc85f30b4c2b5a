"""torch.compile of the lean formulas (normmatters.kernels.compiled): one compiled copy per (direction, norm,
dtype, layout), parameters passed as plain tensors, compile time recorded once, and the per-device fallback to
eager after one warning. torch.compile is stood in for where only the bookkeeping is under test; the last test
compiles for real on the test device."""

import warnings

import pytest
import torch

from normmatters.kernels import compiled, formulas, gaussian_constant


@pytest.fixture
def fresh(monkeypatch):
    """Empty caches, and a torch.compile that records what it was given and returns it uncompiled."""
    monkeypatch.setattr(compiled, "_compiled", {})
    monkeypatch.setattr(compiled, "_failed", set())
    monkeypatch.setattr(compiled, "compile_seconds", {})
    seen = []

    def fake_compile(fn, *a, **k):
        seen.append(fn)
        return fn
    monkeypatch.setattr(torch, "compile", fake_compile)
    return seen


def _args(x5, dtype=torch.float32):
    C = x5.shape[3]
    w, b = torch.nn.Parameter(torch.ones(C, dtype=dtype)), torch.nn.Parameter(torch.zeros(C, dtype=dtype))
    c = gaussian_constant("l1", x5.shape[2] * x5.shape[4], 10, None, x5.dtype, x5.device)
    return (x5, w, b, c, 1e-5, "l1", 10)


def test_copy_is_the_same_function_under_another_name():
    f = compiled._copy(formulas.stats, "l1_float32")
    assert f.__name__ == f.__code__.co_name == "stats_l1_float32"
    assert f.__code__ is not formulas.stats.__code__
    x5 = torch.randn(1, 1, 4, 3, 5)
    for a, b in zip(f(x5, "l1", 10), formulas.stats(x5, "l1", 10), strict=True):
        assert torch.equal(a, b)


def test_one_variant_per_direction_norm_dtype_and_layout(fresh):
    cpu = torch.device("cpu")
    fwd = compiled.get("forward", "l1", cpu)
    fwd(*_args(torch.randn(1, 1, 4, 3, 5)))
    fwd(*_args(torch.randn(1, 1, 6, 3, 5)))  # another size: the same variant (dynamic shapes)
    fwd(*_args(torch.randn(1, 1, 4, 3, 1)))  # S = 1 (channels-last / (N, C) rows): its own
    fwd(*_args(torch.randn(1, 1, 4, 3, 5, dtype=torch.float64), torch.float64))
    assert set(compiled._compiled) == {("forward", "l1", "float32", "channels"), ("forward", "l1", "float32", "rows"),
                                       ("forward", "l1", "float64", "channels")}
    assert [f.__name__ for f in fresh] == ["forward_l1_float32", "forward_l1_float32_rows", "forward_l1_float64"]
    assert set(compiled.compile_seconds) == {("forward", "l1", "torch.float32", "cpu"),
                                             ("forward", "l1", "torch.float64", "cpu")}


def test_parameters_reach_the_kernel_as_plain_tensors(fresh, monkeypatch):
    got = []
    monkeypatch.setattr(torch, "compile", lambda fn, *a, **k: lambda *args, **kw: got.append(args))
    compiled.get("forward", "l1", torch.device("cpu"))(*_args(torch.randn(1, 1, 4, 3, 5)))
    assert got and not any(isinstance(a, torch.nn.Parameter) for a in got[0])


def test_failure_falls_back_per_device_with_one_warning(fresh, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("no Triton here\nsecond line")
    monkeypatch.setattr(torch, "compile", lambda fn, *a, **k: broken)
    args = _args(torch.randn(1, 1, 4, 3, 5))
    ref = formulas.forward(*args)
    # the device only names the compiler that failed: a CUDA failure leaves the CPU compiled
    with pytest.warns(RuntimeWarning, match=r"unavailable on cuda \(RuntimeError: no Triton here\)") as rec:
        out = compiled.get("forward", "l1", torch.device("cuda"))(*args)
        compiled.get("backward", "l1", torch.device("cuda"))  # after a failure: the plain formulas
    assert len(rec) == 1 and compiled._failed == {"cuda"}
    torch.testing.assert_close(out[0], ref[0], rtol=0, atol=0)
    assert compiled.get("backward", "l1", torch.device("cuda")) is formulas.backward
    assert compiled.get("backward", "l1", torch.device("cpu")) is not formulas.backward


def test_compiled_forward_on_the_test_device_matches_eager(device):
    x5 = torch.randn(2, 1, 4, 3, 5, device=device) * 2 + 1
    args = _args(x5)
    args = (x5, args[1].detach().to(device), args[2].detach().to(device), args[3], *args[4:])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no silent fallback to eager
        out = compiled.get("forward", "l1", x5.device)(*args)
    ref = formulas.forward(*args)
    for a, b in zip(out[:3], ref[:3], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
