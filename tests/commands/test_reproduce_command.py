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
    assert main(["reproduce", "batch-size"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("reproduce: argument study: invalid choice: 'batch-size'") and err.count("\n") == 1


def test_reproduce_swap_quick_one_norm(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.py").write_text("def f(x):\n    return x * 2 + 1\n" * 600)
    assert main(["reproduce", "swap", "--quick", "--norms", "l1", "--corpus", str(corpus),
                 "--out", str(tmp_path / "swap")]) == 0
    out = capsys.readouterr().out
    assert "| transformer | l1 | scratch |" in out and "| resnet | l1 | calibrated |" in out and "report:" in out
    header = (tmp_path / "swap" / "results.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["model", "norm", "stage"] and {"val_loss", "drift", "accuracy", "bpc"} <= set(header)
    assert (tmp_path / "swap" / "swap.png").exists() and (tmp_path / "swap" / "report.md").exists()


def test_reproduce_swap_rejects_bad_settings_before_training(tmp_path, capsys):
    assert main(["reproduce", "swap", "--norms", "mean", "--out", str(tmp_path / "swap")]) == 2
    err = capsys.readouterr().err
    assert "norm 'mean' does not divide" in err and err.count("\n") == 1
    assert main(["reproduce", "swap", "--seeds", "0", "1", "--out", str(tmp_path / "swap")]) == 2
    assert "one seed" in capsys.readouterr().err
    assert not (tmp_path / "swap").exists()
