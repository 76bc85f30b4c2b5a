"""Metrics files: torn last lines tolerated, damaged ones named, resume rewrites atomically."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap

import pytest

from normmatters.experiments.metrics import MetricsFileError, MetricsWriter, read_jsonl


def _fill(folder, steps=20, per_epoch=5):
    w = MetricsWriter(folder)
    for g in range(1, steps + 1):
        w.write({"kind": "step", "global_step": g, "epoch": (g - 1) // per_epoch, "loss": 1.0 / g})
        if g % per_epoch == 0:
            w.write({"kind": "epoch", "global_step": g, "epoch": g // per_epoch, "test_acc": 0.5})
    return w


def test_torn_last_line_skipped_with_warning(tmp_path, caplog):
    w = _fill(tmp_path)
    with w.jsonl.open("a") as f:
        f.write('{"kind": "step", "global_step": 21, "loss": 0.')
    with caplog.at_level(logging.WARNING):
        records = read_jsonl(w.jsonl)
    assert len(records) == 24 and records[-1]["kind"] == "epoch"
    assert "torn last line 25" in caplog.text


def test_damaged_line_before_the_end_is_an_error(tmp_path):
    w = _fill(tmp_path)
    lines = w.jsonl.read_text().splitlines()
    lines[3] = lines[3][:10]
    w.jsonl.write_text("\n".join(lines) + "\n")
    with pytest.raises(MetricsFileError, match=r"metrics.jsonl: line 4 is not a JSON record"):
        read_jsonl(w.jsonl)


def test_truncate_after_keeps_earlier_records_and_rebuilds_csvs(tmp_path):
    w = _fill(tmp_path)
    with w.jsonl.open("a") as f:
        f.write('{"kind": "st')  # torn line from a kill: dropped too
    assert w.truncate_after(10) == 12
    recs = read_jsonl(w.jsonl)
    assert [r["global_step"] for r in recs if r["kind"] == "step"] == list(range(1, 11))
    assert [r["epoch"] for r in recs if r["kind"] == "epoch"] == [1, 2]
    epochs = (tmp_path / "epochs.csv").read_text().splitlines()
    assert epochs == ["global_step,epoch,test_acc", "5,1,0.5", "10,2,0.5"]
    assert len((tmp_path / "steps.csv").read_text().splitlines()) == 11
    assert w.truncate_after(-1) == 12 and read_jsonl(w.jsonl) == []
    assert not (tmp_path / "epochs.csv").exists() and not (tmp_path / "steps.csv").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_file_size_limit_mid_rewrite_loses_nothing(tmp_path):
    """The reported failure: RLIMIT_FSIZE hit while rewriting on resume halved metrics.jsonl. Now the rewrite
    goes to a temporary file, fails as a whole, and the old files stay byte for byte."""
    _fill(tmp_path, steps=400)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    limit = len(before["metrics.jsonl"]) // 2
    code = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
        from normmatters.atomic_write import DiskFullError
        from normmatters.experiments.metrics import MetricsWriter
        try:
            MetricsWriter({str(tmp_path)!r}).truncate_after(390)
        except DiskFullError as e:
            print("DiskFullError:", e)
            sys.exit(3)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 3, r.stderr
    assert "no space left while writing" in r.stdout and "metrics.jsonl is intact" in r.stdout
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_records_roundtrip(tmp_path):
    w = MetricsWriter(tmp_path)
    w.write({"kind": "epoch", "global_step": 3, "x": float("nan")})
    (r,) = read_jsonl(w.jsonl)
    assert r["global_step"] == 3 and r["x"] != r["x"]
    assert json.loads(w.jsonl.read_text().splitlines()[0])["kind"] == "epoch"


def test_appends_never_follow_a_symlink(tmp_path):
    from normmatters.atomic_write import SymlinkError

    outside = tmp_path / "outside"
    outside.mkdir()
    run = tmp_path / "run"
    w = MetricsWriter(run)
    (run / "steps.csv").symlink_to(outside / "never-created")  # dangling
    (run / "metrics.jsonl").symlink_to(outside / "kept.jsonl")
    (outside / "kept.jsonl").write_text("keep me")
    with pytest.raises(SymlinkError, match="metrics.jsonl is a symbolic link"):
        w.write({"kind": "step", "global_step": 1, "loss": 1.0})
    (run / "metrics.jsonl").unlink()
    with pytest.raises(SymlinkError, match="steps.csv is a symbolic link"):
        w.write({"kind": "step", "global_step": 1, "loss": 1.0})
    assert (outside / "kept.jsonl").read_text() == "keep me" and not (outside / "never-created").exists()


def test_tensorboard_scalars_and_resume_purge(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from normmatters.experiments.metrics import TENSORBOARD_DIR, MetricsWriter

    w = MetricsWriter(tmp_path, tensorboard=True)
    for step in (1, 2, 3, 4):
        w.write({"kind": "step", "global_step": step, "epoch": 0, "loss": float(step), "effective_lr/c": 0.5})
    w.write({"kind": "epoch", "global_step": 4, "epoch": 1, "train_loss": 2.0, "lr": 0.1, "test_acc": 0.5})
    w.flush()
    resumed = MetricsWriter(tmp_path, tensorboard=True)  # a run resumed from its checkpoint at step 2
    resumed.truncate_after(2)
    resumed.write({"kind": "step", "global_step": 3, "epoch": 0, "loss": 30.0, "effective_lr/c": 0.5})
    resumed.flush()
    acc = EventAccumulator(str(tmp_path / TENSORBOARD_DIR))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"loss", "effective_lr/c", "train_loss", "test_acc"}  # no kind, epoch, lr
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 1.0), (2, 2.0), (3, 30.0)]
