from normmatters.cli import main


def test_reproduce_weight_decay_quick(tmp_path, capsys):
    assert main(["reproduce", "weight-decay", "--seeds", "0", "--epochs", "1", "--out", str(tmp_path / "wd")]) == 0
    out = capsys.readouterr().out
    assert "| mimic-ref | 1 |" in out and "report:" in out
    assert (tmp_path / "wd" / "report.md").exists()
    header = (tmp_path / "wd" / "results.csv").read_text().splitlines()[0]
    assert header.startswith("mode,seed,test_acc,angle_final,angle_floor,elr_ratio_median,elr_ratio_iqr,"
                             "angular_update_ratio_phase1_median,angular_update_ratio_phase1_iqr")


def test_reproduce_weight_decay_adamw(tmp_path, capsys):
    args = ["reproduce", "weight-decay", "--seeds", "0", "--epochs", "2", "--milestones", "1", "--optimizer",
            "adamw", "--lr", "0.001", "--weight-decay", "0.5", "--out", str(tmp_path / "wd")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| mimic-replay | 1 |" in out and "| mimic-online |" not in out  # online rescale models SGD only
    report = (tmp_path / "wd" / "report.md").read_text()
    assert "AdamW lr 0.001" in report and "λ = 0.5" in report and "epochs [1]" in report


def test_reproduce_rejects_unknown_study(capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["reproduce", "batch-size"])
    assert "invalid choice" in capsys.readouterr().err
