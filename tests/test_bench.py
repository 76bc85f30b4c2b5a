"""The benchmark's machinery (not its timings): rows, ratios, saved-bytes accounting, the ResNet-20 variants."""

import json
import math

import torch
from torch import nn

from normmatters import bench


def test_run_benchmark_rows_and_table():
    res = bench.run_benchmark(norms=("range",), shapes=((4, 3, 4, 4), (8, 5)), rounds=1, resnet=False)
    rows = res["rows"]
    # per shape: dtypes fp32 + bf16, layouts contiguous (+ channels_last for 4-d); per case the norm, its
    # in-place row and the bn(eager) row
    assert len(rows) == (2 * 2 + 2 * 1) * 3
    assert sum(r["norm"] == "range+inplace" for r in rows) == 6
    for r in rows:
        if r["norm"] != "range+inplace":
            assert r["step_ms"] > 0 and r["roof"] > 0
        if r["norm"] == "range":
            assert math.isfinite(r["step_bn"]) and r["saved"] > 0
        if r["norm"] == "range+inplace":
            assert r["saved"] > 0 and math.isnan(r["step_bn"])
    assert "| 4x3x4x4 | float32 | channels_last | range |" in res["table"]
    assert res["copy_bandwidth_GBps"] > 0 and res["resnet20_step_ratio"] == {}


def test_saved_bytes_of_lean_layer_at_most_batchnorm():
    x = torch.randn(8, 4, 6, 6, requires_grad=True)
    base = bench.saved_bytes(lambda: nn.BatchNorm2d(4)(x))
    for norm in ("l2", "l1", "linf", "range", "mean"):
        from normmatters import LpBatchNorm2d
        assert bench.saved_bytes(lambda norm=norm: LpBatchNorm2d(4, norm=norm)(x)) <= base, norm


def test_unique_saved_bytes_counts_a_storage_once():
    x = torch.randn(16, 32, requires_grad=True)
    w = torch.randn(32, 32, requires_grad=True)

    def twice():
        h = x @ w
        return (h * h).sum()  # mul saves h twice (as self and as other)

    assert bench.saved_bytes(twice) > bench.unique_saved_bytes(twice)
    assert bench.unique_saved_bytes(twice) == (16 * 32 + 16 * 32 + 32 * 32) * 4  # x, h, w


def test_resnet20_variants_and_ratios():
    res = bench.bench_resnet20(("l1",), torch.device("cpu"), rounds=1, batch=4)
    assert set(res["step"]) == {"l1", "wn+mean", "bwn+mean"} == set(res["saved"])
    assert res["bn_ms"] > 0 and all(v > 0 for v in res["step"].values())
    # l1 saves no more activations than nn.BatchNorm2d; the weight-norm forms keep about the same (their
    # normalized weights are recomputed per step and saved, a few KB)
    assert res["saved"]["l1"] <= 1.0 + 1e-6
    assert 0.9 < res["saved"]["bwn+mean"] < 1.5  # batch 4: weights weigh more
    model = bench._resnet20_variant("bwn+mean", torch.device("cpu"))
    norms = {getattr(m, "norm", None) for m in model.modules()}
    assert "mean" in norms and not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert any(hasattr(m, "parametrizations") for m in model.modules())


def test_bench_command_prints_table_first_call_costs_and_json(tmp_path, capsys, monkeypatch):
    """`normmatters bench`: the table, the native library's first-call cost, the compile seconds and --json."""
    from normmatters.cli import main
    from normmatters.kernels import native

    real = bench.run_benchmark
    monkeypatch.setattr(bench, "run_benchmark",
                        lambda **kw: real(**{**kw, "shapes": ((4, 3, 4, 4),), "rounds": 1}))
    have_native = native.available()  # False only on a machine without a C compiler
    out = tmp_path / "bench.json"
    rc = main(["bench", "--quick", "--no-resnet", "--norms", "l1", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| 4x3x4x4 | float32 | contiguous | l1 |" in text
    assert "first-call (compile) seconds" in text
    assert ("native kernels: library" in text) == have_native
    res = json.loads(out.read_text())
    assert res["rows"] and (res["native_first_call"][1] in ("compiled", "cached") if have_native else True)
