"""``normmatters bench --sync`` machinery: two gloo ranks, one round — the rows and the traffic they count."""

from __future__ import annotations

from normmatters.sync_bench import format_sync_table, run_sync_benchmark


def test_sync_benchmark_counts_the_collectives_of_each_norm():
    res = run_sync_benchmark(world=2, shape=(4, 4, 2, 2), rounds=1, norms=("l2", "mean", "topk"))
    rows = {r["norm"]: r for r in res["rows"]}
    C = 4
    # every norm: one all-gather of [count, Σx] in float64 and one backward all-reduce of [Σg·w, Σg·w·d]
    assert rows["mean"]["forward"] == [f"all_gather {8 * (C + 1)} B"]
    assert rows["mean"]["backward"] == [f"all_reduce {8 * C} B"]
    assert rows["l2"]["forward"] == [f"all_gather {8 * (C + 1)} B", f"all_reduce {4 * C} B"]
    assert rows["l2"]["bytes"] == 20 * C + 8
    assert rows["topk"]["bytes"] == (32 + 4 * 10) * C + 8  # k = 10 largest |d| per channel gathered
    assert rows["l2"]["sync_over_sync_l2"] == 1.0 and all(r["sync_ms"] > 0 and r["local_ms"] > 0 for r in rows.values())
    table = format_sync_table(res)
    assert table.count("\n| ") == 1 + 3 and "| topk |" in table
