import csv
import math

import pytest

from normmatters.experiments.weight_decay import WeightDecayStudy
from normmatters.experiments.weight_decay_report import (
    RESULT_COLUMNS,
    format_weight_decay_table,
    result_columns,
    summarize_weight_decay,
    write_weight_decay_report,
)


def _fake(mode, seed, acc, angles, floor, elr, iqr):
    phases = [{"phase": 1, "lr": 0.005, "first_step": 0, "end_step": 4, "measured_deg": 1.0 + seed,
               "equilibrium_deg": 1.3, "ratio_median": 1.0 if mode == "wd" else 0.1 * seed,
               "ratio_iqr": 0.0 if mode == "wd" else 0.5 * seed}]
    return {"mode": mode, "seed": seed, "test_acc": acc, "angle_deg": angles, "angle_final": angles[-1],
            "angle_floor": floor, "elr_ratio_median": elr, "elr_ratio_iqr": iqr, "angular_update": phases,
            "effective_lr": [0.1, 0.2, 0.3, 0.4], "angle_per_step_deg": [1.0, 1.1, 0.9, 1.0], "steps_per_epoch": 2}


RESULTS = [r for seed in (0, 1) for r in (
    _fake("wd", seed, 0.99, [0.0, 0.0], 40.0 + seed, 1.0, 0.0),
    _fake("wd-twin", seed, 0.98, [2.0, 40.0 + seed], 40.0 + seed, 1.1, 0.4),
    _fake("none", seed, 0.97 - 0.02 * seed, [4.0, 60.0], 40.0 + seed, 0.01, 0.02),
)]


def test_summary_means_and_ratios():
    rows = {r["mode"]: r for r in summarize_weight_decay(RESULTS)}
    assert list(rows) == ["wd", "wd-twin", "none"]
    assert rows["none"]["acc_mean"] == pytest.approx(0.96) and rows["none"]["acc_std"] == pytest.approx(0.02 / 2**0.5)
    assert rows["none"]["early_ratio"] == pytest.approx(2.0)  # epoch-1 angle 4 over the twin's 2
    assert rows["none"]["angle_floor"] == pytest.approx(40.5)
    assert rows["wd"]["phases"][0]["measured_deg"] == pytest.approx(1.5)
    table = format_weight_decay_table(RESULTS)
    assert "| none | 2 | 96.00 ± 1.41 % | 2.00 | 60.00° | 1.48 | 0.010 (0.020) | 1.500° | 0.050 (0.250) |" in table
    assert table.splitlines()[-1].startswith("| equilibrium √(2ηλ/(1+μ)) |") and "1.300°" in table


def test_csv_columns_exactly(tmp_path):
    write_weight_decay_report(WeightDecayStudy(seeds=(0, 1), epochs=2, milestones=(1,)), RESULTS, tmp_path)
    with open(tmp_path / "results.csv") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == list(result_columns(1)) == [*RESULT_COLUMNS, "angular_update_ratio_phase1_median",
                                                  "angular_update_ratio_phase1_iqr"]
    assert rows[3] == ["none", "0", "0.970000", "60.0000", "40.0000", "0.010000", "0.020000", "0.000000",
                       "0.000000"]
    assert rows[6][-2:] == ["0.100000", "0.500000"]  # none, seed 1
    assert len(rows) == 7 and (tmp_path / "results.json").exists()


def test_missing_twin_gives_no_early_ratio():
    rows = summarize_weight_decay([r for r in RESULTS if r["mode"] != "wd-twin"])
    assert math.isnan(rows[1]["early_ratio"]) and "| none | 2 | 96.00 ± 1.41 % | — |" in format_weight_decay_table(
        [r for r in RESULTS if r["mode"] != "wd-twin"])
