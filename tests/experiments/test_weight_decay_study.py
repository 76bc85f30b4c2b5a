from normmatters.experiments.weight_decay import (
    MODES,
    WeightDecayStudy,
    format_weight_decay_table,
    run_weight_decay_study,
    write_weight_decay_report,
)


def test_study_runs_every_mode_and_writes_a_report(tmp_path):
    study = WeightDecayStudy(seeds=(0,), epochs=2, milestones=(1,), model="resnet8")
    results = run_weight_decay_study(study)
    assert [r["mode"] for r in results] == list(MODES)
    by = {r["mode"]: r for r in results}
    assert by["wd"]["angle_deg"] == [0.0, 0.0]
    assert len(by["wd"]["trajectory"]) == len(by["wd"]["effective_lr"]) > 0  # one record per step
    # before the first milestone the norm schedule changes nothing: identical to the no-decay run
    assert abs(by["norm-schedule"]["angle_deg"][0] - by["none"]["angle_deg"][0]) < 1e-3
    # weight decay moved the directions, and both mimics land closer to the decay run than no decay does
    assert by["none"]["angle_deg"][-1] > 0.1
    assert by["mimic-ref"]["angle_deg"][-1] < by["none"]["angle_deg"][-1]
    assert by["mimic-online"]["angle_deg"][-1] < by["none"]["angle_deg"][-1]
    report = write_weight_decay_report(study, results, tmp_path)
    assert "| mimic-online | 1 |" in report.read_text() and "| mimic-online | 1 |" in format_weight_decay_table(results)
    assert (tmp_path / "angles.png").stat().st_size > 1000 and (tmp_path / "effective_lr.png").exists()
