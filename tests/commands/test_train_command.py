from __future__ import annotations

import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
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


# ------------------------------------------------------------------ hostile files and bad settings
FAST = ["--model", "mlp", "--batch-size", "256", "--threads", "1", "--quiet"]


class _Touch:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", "--out", str(out), "--epochs", "1", *FAST]) == 0
    return out


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lr", "inf"], "lr must be a finite number > 0, got inf"),
        (["--lr", "nan"], "lr must be a finite number > 0, got nan"),
        (["--momentum", "nan"], r"momentum must be in \[0, 1\), got nan"),
        (["--momentum", "2"], r"momentum must be in \[0, 1\), got 2.0"),
        (["--weight-decay", "nan"], "weight_decay must be a finite number ≥ 0, got nan"),
        (["--wd-normalized", "-1"], "wd_normalized must be a finite number ≥ 0"),
        (["--gamma", "-1"], "gamma must be a finite number > 0"),
        (["--schedule", "multistep", "--milestones", "-2", "3"], "milestones must be increasing epochs ≥ 1"),
        (["--warmup-epochs", "1e9"], r"warmup_epochs must lie in \[0, epochs=1\], got 1000000000.0"),
        (["--seed", "-1"], "seed must be an int in 0 .. 2\\*\\*32 - 1"),
        (["--norm-option", "kk=5"], r"norm_options \{'kk': 5\} are not accepted by norm='bn'"),
        (["--norm", "bn", "--norm-option", "k=5"], r"norm_options \{'k': 5\} are not accepted by norm='bn'"),
    ],
)
def test_bad_flags_exit_2_with_a_message(tmp_path, capsys, flags, message):
    assert main(["train", "--out", str(tmp_path / "o"), "--epochs", "1", *FAST, *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("train: ") and re.search(message, err), err
    assert not (tmp_path / "o" / "checkpoint.pt").exists()


@pytest.mark.parametrize(
    "text, message",
    [
        ("lr: [0.1]\n", r"lr must be a number, got \[0.1\] \(list\)"),
        ('lr: "0.1"\n', r"lr must be a number, got '0.1' \(str\)"),
        ("model: [mlp]\n", r"model must be a string, got \['mlp'\] \(list\)"),
        ("norm_options: 5\n", "norm_options must be a mapping"),
        ("seed: 1.5\n", r"seed must be an int, got 1.5 \(float\)"),
        ('nesterov: "false"\n', "nesterov must be true or false .*got 'false'"),
        ('hflip: "no"\n', "hflip must be true or false .*got 'no'"),
    ],
)
def test_bad_config_values_name_the_key_and_file(tmp_path, capsys, text, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    assert main(["train", "--out", str(tmp_path / "o"), "--config", str(cfg), "--epochs", "1", *FAST[2:]]) == 2
    err = capsys.readouterr().err
    assert re.search(r"^train: .*c\.yaml: config: " + message, err), err


def test_out_that_is_a_file_or_unwritable(tmp_path, capsys, monkeypatch):
    (tmp_path / "afile").write_text("x")
    assert main(["train", "--out", str(tmp_path / "afile"), "--epochs", "1", *FAST]) == 2
    assert "afile is a file; expected a folder" in capsys.readouterr().err
    from normmatters.experiments import run_folder

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(run_folder.tempfile, "TemporaryFile", denied)
    assert main(["train", "--out", str(tmp_path / "ro"), "--epochs", "1", *FAST]) == 2
    assert "cannot write to output folder" in capsys.readouterr().err


def test_crafted_checkpoint_runs_nothing_and_is_refused(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path / "evil")
    marker = tmp_path / "PWNED"
    torch.save({"payload": _Touch(marker), "model": {}}, run / "checkpoint.pt")
    assert main(["train", "--out", str(run), "--resume", "--epochs", "2", "--quiet"]) == 2
    assert not marker.exists()
    assert "no whole-file checksum" in capsys.readouterr().err  # refused before anything in it is unpickled


def test_bit_flipped_checkpoint_refused_and_kept(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path / "flip")
    p = run / "checkpoint.pt"
    b = bytearray(p.read_bytes())
    for i in range(len(b) // 2, len(b) // 2 + 64):
        b[i] ^= 0xFF
    p.write_bytes(bytes(b))
    assert main(["train", "--out", str(run), "--resume", "--epochs", "2", "--quiet"]) == 2
    assert "does not match the checksum" in capsys.readouterr().err
    assert p.read_bytes() == bytes(b)


def test_torn_metrics_line_does_not_block_resume(finished, tmp_path):
    run = _copy(finished, tmp_path / "torn")
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 99, "loss": 0.')
    assert main(["train", "--out", str(run), "--resume", "--epochs", "2", "--quiet"]) == 0
    epochs = [r["epoch"] for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "epoch"]
    assert epochs == [1, 2]


def test_resume_of_a_complete_run(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path / "done")
    assert main(["train", "--out", str(run), "--resume"]) == 0
    assert "is already complete: 1 of 1 epochs trained" in capsys.readouterr().out


def test_cifar_folder_with_a_code_object(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": np.random.randint(0, 256, (20, 3072), dtype=np.uint8),
                 b"labels": [i % 10 for i in range(20)], b"batch_label": _Touch(marker)}
        (tmp_path / name).write_bytes(pickle.dumps(batch))
    assert main(["train", "--out", str(tmp_path / "o"), "--dataset", f"cifar:{tmp_path}", "--epochs", "1",
                 *FAST]) == 2
    assert not marker.exists()
    assert "data_batch_1: not a CIFAR batch: the pickle names" in capsys.readouterr().err


def test_nan_loss_exits_non_zero(tmp_path, capsys):
    """A learning rate the model cannot take: stops with a clear message, exit 1, no traceback."""
    r = subprocess.run([sys.executable, "-m", "normmatters", "train", "--out", str(tmp_path / "o"), "--epochs", "3",
                        "--model", "mlp", "--norm", "none", "--lr", "1e12", "--momentum", "0", "--no-monitor",
                        "--threads", "1", "--quiet"], capture_output=True, text=True)
    assert r.returncode == 1, r.stderr
    assert "training diverged" in r.stderr and "Traceback" not in r.stderr


def test_full_disk_while_saving_says_so(finished, tmp_path, capsys, monkeypatch):
    import errno
    import os

    from normmatters.experiments import checkpoint

    run = _copy(finished, tmp_path / "full")
    good = (run / "checkpoint.pt").read_bytes()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint.torch, "save", full)
    assert main(["train", "--out", str(run), "--resume", "--epochs", "2", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("train: ") and "no space left while writing" in err and "checkpoint.pt is intact" in err
    assert (run / "checkpoint.pt").read_bytes() == good and not list(run.glob(".*.tmp"))


def test_tensorboard_writes_scalar_events_beside_the_jsonl(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    assert main(["train", "--model", "resnet8", "--epochs", "1", "--batch-size", "256", "--log-every", "2",
                 "--threads", "1", "--quiet", "--tensorboard", "--out", str(out)]) == 0
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "lr", "train_loss", "test_acc", "effective_lr/conv1.weight", "angular_update/conv1.weight",
            "angular_update/equilibrium"} <= tags
    steps = [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "step"]
    events = acc.Scalars("effective_lr/conv1.weight")
    assert [e.step for e in events] == [r["global_step"] for r in steps]  # the JSONL's values, at its steps
    assert [e.value for e in events] == pytest.approx([r["effective_lr/conv1.weight"] for r in steps], rel=1e-6)


def test_wd_mimic_replay_with_adamw(tmp_path):
    out = tmp_path / "m"
    assert main(["train", "--model", "resnet8", "--epochs", "1", "--batch-size", "256", "--log-every", "2",
                 "--threads", "1", "--quiet", "--optimizer", "adamw", "--lr", "0.003", "--wd-normalized", "0.1",
                 "--wd-mimic", "replay", "--out", str(out)]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["mimic_weight_decay"] == "online" and saved["mimic_rule"] == "replay"
    step = [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "step"][-1]
    assert step["effective_lr/conv1.weight"] > 0
    # the rescale rule's online form models SGD only: the config says which rule to use
    assert main(["train", "--model", "resnet8", "--epochs", "1", "--optimizer", "adamw", "--wd-mimic", "online",
                 "--out", str(tmp_path / "x")]) == 2
