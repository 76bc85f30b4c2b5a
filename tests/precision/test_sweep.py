"""Sweep, command and training evidence: small grids that still show the expected failures."""

import math

from normmatters.cli import main
from normmatters.precision.sweep import run_sweep, usable_range


def test_sweep_finds_the_fp16_l2_overflow_and_l1_accumulator_limit():
    rec = run_sweep(formats=("fp32", "fp16"), norms=("l2", "l1", "range"), dists=("gaussian",),
                    log2_scales=(-4, 0, 6, 9), log2_ns=(6, 12))
    err = {(r.format, r.norm, r.log2_n, r.log2_scale): r.err_out for r in rec}
    assert all(v < 1e-6 for (f, *_), v in err.items() if f == "fp32")
    assert err[("fp16", "l2", 6, 9)] > 0.5  # |x − μ| ≈ 512: squares overflow
    assert err[("fp16", "l1", 6, 9)] < 0.01 and err[("fp16", "range", 6, 9)] < 0.01
    assert err[("fp16", "l1", 12, 9)] > 0.5  # but Σ|d| of 4096 values ≈ 1.6e6 overflows fp16 too
    assert err[("fp16", "range", 12, 9)] < 0.01
    assert usable_range(rec, "fp16", "l2", 6) == (-4, 0)  # at 2^6, Σd² ≈ 64·4096 > 65504 already
    assert usable_range(rec, "fp16", "range", 12) == (-4, 9)
    assert not any(math.isnan(r.err_out) for r in rec)


def test_precision_command_quick(tmp_path, capsys):
    assert main(["precision", "--quick", "--formats", "fp16", "--norms", "l2", "l1", "--dists", "gaussian",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| fp16 | l2 | 2^-8..2^0 |" in out
    assert (tmp_path / "precision.csv").read_text().count("\n") == 1 + 2 * 3 * 7
    assert (tmp_path / "precision_fp16.png").stat().st_size > 1000
