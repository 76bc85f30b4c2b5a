from normmatters.experiments.weight_norm_study import (
    EXPERIMENTS,
    WeightNormStudy,
    format_weight_norm_tables,
    run_weight_norm_study,
    write_weight_norm_report,
)


def test_study_runs_every_variant_and_writes_a_report(tiny, tmp_path):
    study = WeightNormStudy(seeds=(0,), cnn_model="resnet8", cnn_epochs=1, lstm_epochs=1, batch_epochs=1)
    results = run_weight_norm_study(study, data=tiny)
    assert [(r["experiment"], r["variant"]) for r in results] == [
        (e, v) for e in ("cnn", "lstm", "batches") for v in EXPERIMENTS[e]]
    assert all(0.0 <= r["test_acc"] <= 1.0 for r in results)
    table = format_weight_norm_tables(results)
    assert "| bwn-linf | 1 |" in table and "| bwn-nonorm, class-sorted | 1 |" in table
    report = write_weight_norm_report(study, results, tmp_path)
    assert "**lstm**" in report.read_text()
    assert all((tmp_path / f"{e}.png").stat().st_size > 1000 for e in ("cnn", "lstm", "batches"))
