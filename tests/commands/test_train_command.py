from __future__ import annotations

import yaml

from normmatters.cli import main
from normmatters.experiments.metrics import read_jsonl


def test_train_from_yaml_writes_config_back_and_resumes(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "model: mlp\nnorm: topk\nnorm_options: {k: 4}\nepochs: 1\nbatch_size: 128\n"
        "optimizer: adamw\nlr: 0.003\nwd_normalized: 0.01\nthreads: 1\n"
    )
    out = tmp_path / "out"
    assert main(["train", "--config", str(cfg), "--out", str(out), "--quiet", "--log-every", "5"]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["norm_options"] == {"k": 4} and saved["optimizer"] == "adamw" and saved["wd_norm"] == 0.0
    assert "test acc" in capsys.readouterr().out
    # extend the finished run by one epoch
    assert main(["train", "--out", str(out), "--resume", "--epochs", "2", "--quiet"]) == 0
    epochs = [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert (out / "curves.png").stat().st_size > 0  # plotted from metrics.jsonl, both epochs


def test_train_errors(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "cannot resume" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "x"), "--optimizer", "lamb"]) == 2
    assert "optimizer must be one of" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "x"), "--norm-option", "k"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_train_weight_norm_flags(tmp_path):
    out = tmp_path / "bwn"
    assert main(["train", "--out", str(out), "--quiet", "--model", "mlp", "--norm", "bn", "--weight-norm", "bwn",
                 "--weight-norm-p", "inf", "--batch-order", "class_sorted", "--epochs", "1", "--threads", "1",
                 "--no-monitor"]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["weight_norm"] == "bwn" and saved["weight_norm_p"] == float("inf")
    assert saved["batch_order"] == "class_sorted"
