"""``normmatters bench --layers --quick`` on its small shapes: the table of ratios per layer kind and norm."""

import subprocess
import sys


def test_bench_layers_quick_prints_the_table():
    r = subprocess.run([sys.executable, "-m", "normmatters", "bench", "--layers", "--quick", "--eager-only",
                        "--norms", "l1", "--rounds", "2"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    for stock in ("nn.LayerNorm 256×192", "nn.RMSNorm 256×192", "nn.GroupNorm 4×64×8×8"):
        assert stock in r.stdout
    assert r.stdout.count("| l1 |") == 3
