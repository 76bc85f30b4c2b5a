from __future__ import annotations

import logging

import pytest

from normmatters.experiments import run_folder as R
from normmatters.experiments.metrics import MetricsWriter, read_jsonl


def test_output_folder_checks(tmp_path, monkeypatch):
    assert R.check_output_folder(tmp_path / "a" / "b").is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(R.OutputFolderError, match=r"output folder .*file is a file"):
        R.check_output_folder(tmp_path / "file")
    with pytest.raises(R.OutputFolderError, match=r"cannot write to output folder .*file/sub"):
        R.check_output_folder(tmp_path / "file" / "sub")

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(R.tempfile, "TemporaryFile", denied)  # a read-only folder (tests may run as root)
    with pytest.raises(R.OutputFolderError, match=r"cannot write to output folder .*ro: Permission denied"):
        R.check_output_folder(tmp_path / "ro")


def test_tidy_removes_orphans_and_fresh_run_keeps_old_metrics(tmp_path, caplog):
    w = MetricsWriter(tmp_path)
    w.write({"kind": "epoch", "global_step": 3, "epoch": 1})
    before = (tmp_path / "metrics.jsonl").read_bytes()
    (tmp_path / ".checkpoint.pt.x1y2.tmp").write_bytes(b"partial")
    (tmp_path / ".metrics.jsonl.abc.tmp").write_bytes(b"partial")
    (tmp_path / "notes.txt").write_text("mine")
    with caplog.at_level(logging.WARNING), pytest.raises(
        R.OutputFolderError, match=r"holds the metrics of an earlier run \(metrics.jsonl, epochs.csv\).*move them away"
    ):
        R.tidy_run_folder(tmp_path, fresh=True, writer=w)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epochs.csv", "metrics.jsonl", "notes.txt"]
    assert (tmp_path / "metrics.jsonl").read_bytes() == before  # refused, nothing discarded
    assert "removed 2 temporary file(s)" in caplog.text


@pytest.mark.parametrize("name", ["metrics.jsonl", "steps.csv", "curves.png", "config.yaml"])
def test_a_symlink_among_the_run_files_is_refused(tmp_path, name):
    outside = tmp_path / "outside"
    outside.mkdir()
    run = tmp_path / "run"
    run.mkdir()
    (run / name).symlink_to(outside / "never-created")  # dangling: following it would create a file outside
    with pytest.raises(R.OutputFolderError, match=rf"{name} is a symbolic link .*never-created.*regular files"):
        R.check_output_folder(run)
    assert list(outside.iterdir()) == []


def test_tidy_on_resume_keeps_metrics(tmp_path):
    w = MetricsWriter(tmp_path)
    w.write({"kind": "epoch", "global_step": 3, "epoch": 1})
    R.tidy_run_folder(tmp_path, fresh=False, writer=w)
    assert len(read_jsonl(tmp_path / "metrics.jsonl")) == 1
