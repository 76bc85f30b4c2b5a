"""The per-sample layer benchmark (normmatters.bench_layers): its cases, rows and ratios on tiny shapes (no timing
targets: the ratios are only checked to be positive numbers)."""

import pytest
import torch

from normmatters import bench_layers


def test_cases_cover_the_transformer_and_group_norm_shapes():
    kinds = {(k, s, d) for k, s, d in bench_layers.CASES}
    for kind in ("layer", "rms"):
        for shape in ((8192, 768), (4096, 4096)):
            for dtype in (torch.float32, torch.bfloat16):
                assert (kind, shape, dtype) in kinds
    assert ("group", (16, 256, 32, 32), torch.float32) in kinds


def test_eager_case_rows(monkeypatch):
    res = bench_layers._case("rms", (16, 24), torch.float32, ("l1", "range"), rounds=2, compiled=False, groups=4)
    assert set(res["eager"]["fwd"]) == set(res["eager"]["fwd_bwd"]) == {"l1", "range"}
    assert all(v > 0 for v in res["eager"]["fwd"].values())
    assert res["saved"]["l1"] <= 1.0  # x, weight and one statistic per row, as nn.RMSNorm
    table = bench_layers.format_table([res])
    assert "nn.RMSNorm 16×24" in table and "| l1 |" in table and "compiled" not in table


def test_compiled_columns():
    res = bench_layers._case("layer", (8, 16), torch.float32, ("l1",), rounds=1, compiled=True, groups=1)
    assert res["compiled"]["fwd_bwd"]["l1"] > 0
    assert "compiled fwd+bwd" in bench_layers.format_table([res])


def test_rejects_mean_only():
    with pytest.raises(ValueError, match="bench --layers: norm='mean'"):
        bench_layers.run_layer_benchmark(quick=True, norms=("mean",))
