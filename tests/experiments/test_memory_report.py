from __future__ import annotations

import pytest
import torch

from normmatters.experiments.compare import RunResult
from normmatters.experiments.memory import saved_activation_bytes
from normmatters.experiments.models import build_model
from normmatters.experiments.report import format_table, summarize, write_report


def test_saved_bytes_scale_with_batch_and_leave_state_alone():
    m = build_model("resnet8", "l1", in_channels=1, image_size=8)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    y = torch.zeros(8, dtype=torch.long)
    small = saved_activation_bytes(m, torch.randn(8, 1, 8, 8), y)
    big = saved_activation_bytes(m, torch.randn(16, 1, 8, 8), torch.zeros(16, dtype=torch.long))
    assert small > 8 * 16 * 8 * 8 * 4  # at least the first conv's output
    assert 1.8 < big / small < 2.2
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def _run(norm, seed, acc, loss, t, mem):
    return RunResult(
        norm,
        seed,
        [
            {"epoch": 1, "train_loss": 2 * loss, "test_acc": acc / 2},
            {"epoch": 2, "train_loss": loss, "test_acc": acc},
        ],
        t,
        mem,
    )


def test_summary_ratios_and_files(tmp_path):
    runs = [
        _run("bn", 0, 0.9, 0.1, 0.010, 100),
        _run("l1", 0, 0.8, 0.2, 0.030, 250),
        _run("bn", 1, 0.7, 0.3, 0.012, 100),
        _run("l1", 1, 0.8, 0.4, 0.020, 250),
    ]
    s = {x.norm: x for x in summarize(runs)}
    assert s["bn"].acc_mean == pytest.approx(0.8) and s["bn"].acc_std == pytest.approx(0.1414, abs=1e-4)
    assert s["l1"].loss_mean == pytest.approx(0.3)
    assert s["bn"].time_ratio == pytest.approx(1.0) and s["l1"].time_ratio == pytest.approx(0.025 / 0.011)
    assert s["l1"].memory_ratio == pytest.approx(2.5)
    table = format_table(list(s.values()))
    assert "| l1 | 2 | 80.00 ± 0.00 % | 0.3000 |" in table
    files = write_report(runs, tmp_path, {"model": "x"}, 1.0)
    assert set(files) == {"runs.jsonl", "runs.csv", "summary.csv", "loss.png", "accuracy.png", "report.md"}
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == 8


def test_side_by_side_ratios_and_one_seed_table(tmp_path):
    runs = [_run("bn", 0, 0.9, 0.1, 0.010, 100), _run("l1", 0, 0.8, 0.2, 0.030, 250)]
    runs[0].step_ratio, runs[1].step_ratio = 1.0, 1.25  # measured side by side: preferred to 0.030 / 0.010
    s = {x.norm: x for x in summarize(runs)}
    assert s["l1"].time_ratio == pytest.approx(1.25)
    table = format_table(list(s.values()))
    assert "±" not in table and "| l1 | 1 | 80.00 % | 0.2000 |" in table and "test acc |" in table
