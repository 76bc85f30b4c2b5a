import csv
import math

import pytest

from normmatters.experiments.weight_decay import MODES, WeightDecayStudy, run_weight_decay_study
from normmatters.experiments.weight_decay_report import (
    RESULT_COLUMNS,
    format_weight_decay_table,
    result_columns,
    write_weight_decay_report,
)
from normmatters.optim import equilibrium_angular_update


@pytest.fixture(scope="module")
def study_results(tiny):
    # tiny digits: 3 steps per epoch, so 4 epochs are 12 steps in three rate phases
    study = WeightDecayStudy(seeds=(0, 1), epochs=4, milestones=(2, 3), model="resnet8")
    return study, run_weight_decay_study(study, data=tiny)


@pytest.fixture(scope="module")
def tiny():
    from normmatters.experiments.data import ArrayDataset, DataSplit, load_digits

    d = load_digits()
    tr, te = d.train, d.test
    return DataSplit("tiny-digits", ArrayDataset(tr.images[:192], tr.labels[:192], tr.classes),
                     ArrayDataset(te.images[:64], te.labels[:64], te.classes))


def test_every_mode_is_measured_against_the_decay_run(study_results):
    _, results = study_results
    assert [r["mode"] for r in results] == list(MODES) * 2
    for seed in (0, 1):
        by = {r["mode"]: r for r in results if r["seed"] == seed}
        floor = by["wd-twin"]["angle_final"]
        assert floor > 0 and all(r["angle_floor"] == floor for r in by.values())
        assert by["wd"]["angle_final"] < 1e-5  # acos of a cosine rounded near 1
        assert by["wd"]["elr_ratio_median"] == 1.0 and by["wd"]["elr_ratio_iqr"] == 0.0
        # the twin's rate is 1.001x: its effective step starts 1.001x the decay run's
        assert by["wd-twin"]["elr_ratio_median"] == pytest.approx(1.001, abs=2e-3)
        # the mimic from the recorded norms applies the decay run's effective step exactly
        assert by["mimic-ref"]["elr_ratio_median"] == pytest.approx(1.0, abs=1e-6)
        assert by["mimic-ref"]["elr_ratio_iqr"] < 1e-6
        # without decay the norms do not shrink: a smaller effective step; the online mimics sit near 1
        assert by["none"]["elr_ratio_median"] < 0.99
        for m in ("mimic-online", "mimic-replay"):
            assert abs(math.log(by[m]["elr_ratio_median"])) < abs(math.log(by["none"]["elr_ratio_median"]))
        # the norm schedule reproduces the rate schedule's effective steps
        assert by["norm-schedule"]["elr_ratio_median"] == pytest.approx(by["none"]["elr_ratio_median"], rel=1e-3)
        # the angular-update ratio: the decay run against itself is 1; mimic-ref's is measured, not set
        assert all(p["ratio_median"] == 1.0 and p["ratio_iqr"] == 0.0 for p in by["wd"]["angular_update"])
        assert all(p["ratio_median"] > 0 for p in by["mimic-ref"]["angular_update"])
        assert by["mimic-ref"]["angular_update"][0]["ratio_median"] != 1.0
        phases = by["wd"]["angular_update"]
        assert [p["lr"] for p in phases] == pytest.approx([0.005, 0.0005, 0.00005])
        assert phases[0]["equilibrium_deg"] == pytest.approx(math.degrees(equilibrium_angular_update(0.005, 0.1, 0.9)))
        assert all(p["measured_deg"] > 0 for p in phases)


def test_results_csv_schema_and_report(study_results, tmp_path):
    study, results = study_results
    report = write_weight_decay_report(study, results, tmp_path, command="normmatters reproduce weight-decay")
    with open(tmp_path / "results.csv") as fh:
        rows = list(csv.reader(fh))
    assert tuple(rows[0]) == result_columns(3)
    assert tuple(rows[0][:7]) == RESULT_COLUMNS == ("mode", "seed", "test_acc", "angle_final", "angle_floor",
                                                    "elr_ratio_median", "elr_ratio_iqr")
    assert rows[0][7:9] == ["angular_update_ratio_phase1_median", "angular_update_ratio_phase1_iqr"]
    assert len(rows) == 1 + len(results)
    for row, r in zip(rows[1:], results):
        assert row[0] == r["mode"] and int(row[1]) == r["seed"]
        values = [float(x) for x in row[2:]]
        assert all(math.isfinite(v) for v in values) and 0 <= values[0] <= 1
    with open(tmp_path / "angular_update.csv") as fh:
        au = list(csv.DictReader(fh))
    assert len(au) == 3 * len(results) and float(au[0]["equilibrium_deg"]) > 0
    text = report.read_text()
    assert "| mimic-online | 2 |" in text and "equilibrium √(2ηλ/(1+μ))" in text
    assert "Command: `normmatters reproduce weight-decay`" in text
    assert "| wd-twin | 2 |" in format_weight_decay_table(results)
    assert (tmp_path / "angles.png").stat().st_size > 1000 and (tmp_path / "effective_lr.png").exists()


def test_study_settings():
    with pytest.raises(ValueError, match="optimizer must be 'sgd' or 'adamw'"):
        WeightDecayStudy(optimizer="adam")
    assert "mimic-online" not in WeightDecayStudy(optimizer="adamw").modes
    s = WeightDecayStudy(epochs=10, milestones=(4, 8), lr=0.1, gamma=0.5)
    assert s.phases(5) == [(0, 20, 0.1), (20, 40, 0.05), (40, 50, 0.025)]
    assert s.config("wd-twin", 0).lr == pytest.approx(0.1001) and s.config("wd-twin", 0).wd_normalized == 0.1
    assert s.config("none", 0).wd_normalized == 0.0
