"""The native kernels' build (normmatters.kernels.native_build): sources shipped as files, the cache keyed by
their hash and the flags, and the compiler-missing fallback (one warning, then the Inductor path)."""

import re
import warnings

import pytest
import torch

import normmatters as nm
from normmatters.kernels import compiled, native, native_build, native_ops
from normmatters.kernels.lean import lean_batch_norm

# the native operators' build and the CPU kernels inside compiled graphs: CPU whatever the test device
pytestmark = pytest.mark.cpu_only


def test_sources_are_files_with_the_operator_schemas():
    names = {p.name for p in native_build.CSRC.iterdir()}
    assert {"ops.cpp", "common.h", "channel_kernels.h", "rows_kernels.h"} <= names
    ops = (native_build.CSRC / "ops.cpp").read_text()
    assert "TORCH_LIBRARY(normmatters, m)" in ops and "TORCH_LIBRARY_IMPL(normmatters, CPU, m)" in ops
    for header in ("common.h", "channel_kernels.h", "rows_kernels.h"):  # templates, not backslash macros
        assert not any(line.rstrip().endswith("\\") for line in (native_build.CSRC / header).read_text().splitlines())


def test_no_ctypes_in_the_package():
    src = native_build.CSRC.parent.parent
    assert not [p for p in src.rglob("*.py") if re.search(r"^\s*(import ctypes|from ctypes)", p.read_text(), re.M)]


def test_cache_key_follows_sources_flags_and_compiler(monkeypatch, tmp_path):
    key = native_build.source_key("g++")
    assert key == native_build.source_key("g++") and key != native_build.source_key("clang++")
    monkeypatch.setattr(native_build, "FLAGS", (*native_build.FLAGS, "-DNM_TEST"))
    assert native_build.source_key("g++") != key
    monkeypatch.setattr(native_build, "FLAGS", native_build.FLAGS[:-1])
    fake = tmp_path / "csrc"
    fake.mkdir()
    for p in native_build.CSRC.iterdir():
        (fake / p.name).write_bytes(p.read_bytes())
    monkeypatch.setattr(native_build, "CSRC", fake)
    assert native_build.source_key("g++") == key
    (fake / "common.h").write_text((fake / "common.h").read_text() + "\n// changed\n")
    assert native_build.source_key("g++") != key


def test_first_build_compiles_into_the_keyed_directory_with_the_flags(monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    calls = []
    monkeypatch.setenv(native_build.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: calls.append(kw))
    assert native_build._build() == "compiled"
    (kw,) = calls
    key = native_build.source_key(native_build._compiler())
    assert kw["build_directory"] == str(tmp_path / f"normmatters_native_{key}")
    assert {"-O3", "-march=native", "-fopenmp"} <= set(kw["extra_cflags"]) and not kw["is_python_module"]
    # every C++ translation unit of csrc/ (the batch-norm operators and the per-sample row-norm operators)
    assert sorted(kw["sources"]) == sorted(str(p) for p in native_build.CSRC.glob("*.cpp"))
    assert str(native_build.CSRC / "ops.cpp") in kw["sources"]


def test_built_library_is_loaded_from_the_cache_without_compiling(monkeypatch):
    if not native.available():
        pytest.skip("native kernels unavailable (no C++ compiler)")
    from torch.utils import cpp_extension

    def no_compile(**kw):
        raise AssertionError("compiled although the library is cached")

    monkeypatch.setattr(cpp_extension, "load", no_compile)
    assert native_build._build() == "cached"  # the same file: dlopen returns the loaded library
    assert native_build.first_call is not None and native_build.first_call[0] > 0


@pytest.fixture
def _unloaded(monkeypatch):
    """As in a fresh process whose build fails: nothing loaded or registered yet; Inductor runs eagerly."""
    monkeypatch.setattr(native_build, "_loaded", False)
    monkeypatch.setattr(native_build, "_failed", False)
    monkeypatch.setattr(native_ops, "_registered", False)
    monkeypatch.setattr(compiled, "_failed", {"cpu"})


def test_missing_compiler_warns_once_and_falls_back(monkeypatch, _unloaded):
    def broken():
        raise RuntimeError("no C++ compiler (c++/g++) on PATH")

    monkeypatch.setattr(native_build, "_build", broken)
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="native CPU kernels are unavailable") as rec:
        for norm, impl in (("l1", "native"), ("range", "auto")):
            y = lean_batch_norm(x, None, None, training=True, norm=norm, impl=impl)
            assert type(y.grad_fn).__name__ == "LeanBatchNormFunctionBackward"
            torch.testing.assert_close(y, nm.lp_batch_norm(x, None, None, training=True, norm=norm))
    assert len([w for w in rec if "native CPU kernels" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not native.available()


def test_missing_compiler_under_torch_compile_warns_once_and_traces_the_formulas(monkeypatch, _unloaded):
    def broken():
        raise RuntimeError("no C++ compiler (c++/g++) on PATH")

    monkeypatch.setattr(native_build, "_build", broken)
    torch._dynamo.reset()
    layer = nm.LpBatchNorm2d(3, norm="l1").train()
    x = torch.randn(8, 3, 4, 4)
    with pytest.warns(RuntimeWarning, match="native CPU kernels are unavailable") as rec:
        y = torch.compile(layer, fullgraph=True)(x)
    assert len([w for w in rec if "native CPU kernels" in str(w.message)]) == 1
    torch.testing.assert_close(y, nm.lp_batch_norm(x, None, None, layer.weight, layer.bias, training=True,
                                                   norm="l1"), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
