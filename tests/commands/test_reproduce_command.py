from normmatters.cli import main


def test_reproduce_weight_decay_quick(tmp_path, capsys):
    assert main(["reproduce", "weight-decay", "--seeds", "0", "--epochs", "1", "--out", str(tmp_path / "wd")]) == 0
    out = capsys.readouterr().out
    assert "| mimic-ref | 1 |" in out and "report:" in out
    assert (tmp_path / "wd" / "report.md").exists()


def test_reproduce_rejects_unknown_study(capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["reproduce", "batch-size"])
    assert "invalid choice" in capsys.readouterr().err
