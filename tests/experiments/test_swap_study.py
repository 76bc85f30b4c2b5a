"""The swap study on tiny settings: every model × norm × stage row, the l2 control is exact, batch norm keeps its
eval-mode function after the swap (running statistics) while layer norm does not, and the files are written."""

import csv

import pytest
import torch

from normmatters.experiments.swap_report import format_swap_table, read_swap_result, write_swap_report
from normmatters.experiments.swap_study import (
    RESULT_COLUMNS,
    STAGES,
    STOCK,
    SwapStudy,
    kl_to_original,
    relative_drift,
    run_swap_study,
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    (d / "a.py").write_text("def f(x):\n    return x * 2 + 1\n" * 300 + "class A:\n    pass\n" * 300)
    return d


@pytest.fixture(scope="module")
def tiny_study(corpus):
    return SwapStudy(norms=("l2", "l1"), corpus=corpus, lm_width=16, lm_heads=2, lm_context=16, lm_batch=4,
                     lm_steps=6, lm_finetune_steps=3, lm_eval_batches=2, cnn_batch=16, cnn_steps=4,
                     cnn_finetune_steps=2, calib_batches=2, finetune_points=(0, 1), bn_impl="eager")


@pytest.fixture(scope="module")
def result(tiny_study):
    return run_swap_study(tiny_study)


def test_kl_to_original():
    ref = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    assert kl_to_original(ref + 5, ref) == pytest.approx(0, abs=1e-12)  # a shift of every logit: no change
    p0, p = torch.tensor([0.5, 0.5]), torch.softmax(torch.tensor([0.0, 1.0]), 0)
    expected = float((p0 * (p0 / p).log()).sum()) / 2
    assert kl_to_original(torch.tensor([[0.0, 1.0], [1.0, 2.0]]), ref) == pytest.approx(expected)


def test_relative_drift():
    ref = torch.tensor([[3.0, 4.0]])
    assert relative_drift(ref, ref) == 0
    assert relative_drift(torch.tensor([[3.0, 4.5]]), ref) == pytest.approx(0.1)
    with pytest.raises(ValueError, match=r"output shape \(2,\) differs from the reference's \(1, 2\)"):
        relative_drift(torch.zeros(2), ref)


def test_every_stage_of_every_norm(result, tiny_study):
    by = {(r["model"], r["norm"], r["stage"]): r for r in result.rows}
    assert len(by) == len(result.rows) == 2 * (2 + 2 * len(STAGES))
    for model, steps, ft in (("transformer", 6, 3), ("resnet", 4, 2)):
        assert by[model, STOCK, "original"]["drift"] == 0 and by[model, STOCK, "original"]["agreement"] == 1
        assert by[model, STOCK, "finetuned"]["steps_total"] == steps + ft
        for norm in ("l2", "l1"):
            assert [by[model, norm, s]["steps_with_norm"] for s in STAGES] == [0, 0, ft, steps + ft]
            assert all(0 <= by[model, norm, s]["accuracy"] <= 1 and by[model, norm, s]["val_loss"] > 0
                       for s in STAGES)
        # the exactness control: l2 is the stock layer, before and after calibration
        assert by[model, "l2", "none"]["drift"] < 1e-5 and by[model, "l2", "calibrated"]["drift"] < 1e-5
        assert by[model, "l2", "none"]["kl"] < 1e-9
        assert by[model, "l2", "none"]["val_loss"] == pytest.approx(by[model, STOCK, "original"]["val_loss"],
                                                                    abs=1e-5)
        # the same fine-tuning of an exact swap is the original's fine-tuning
        assert by[model, "l2", "finetuned"]["val_loss"] == pytest.approx(
            by[model, STOCK, "finetuned"]["val_loss"], rel=1e-3)
    # layer norm has no running statistics: l1 changes the function at once
    assert by["transformer", "l1", "none"]["drift"] > 1e-3
    assert by["transformer", "l1", "none"]["drift_train"] == by["transformer", "l1", "none"]["drift"]
    assert by["transformer", "l1", "none"]["bpc"] > 0
    # batch norm in eval mode normalizes by the copied running statistics; training mode sees the new estimator
    assert by["resnet", "l1", "none"]["drift"] < 1e-6
    assert by["resnet", "l1", "none"]["drift_train"] > 1e-3
    assert by["resnet", "l1", "none"]["bpc"] != by["resnet", "l1", "none"]["bpc"]  # NaN: no bits/char
    assert {(c["model"], c["norm"]) for c in result.calibration} == {("transformer", "l1"), ("resnet", "l1")}
    assert sum(c["model"] == "transformer" for c in result.calibration) == 5  # 2 blocks × 2 + the final norm
    # fine-tuning curves at the points (0, 1) and the last step
    assert {(c["model"], c["norm"], c["step"]) for c in result.curves} == {
        (m, n, s) for m, steps in (("transformer", (0, 1, 3)), ("resnet", (0, 1, 2))) for n in (STOCK, "l2", "l1")
        for s in steps}


def test_report_files(result, tiny_study, tmp_path):
    report = write_swap_report(tiny_study, result, tmp_path / "out", command="normmatters reproduce swap")
    out = report.parent
    with open(out / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == RESULT_COLUMNS and len(rows) == len(result.rows)
    assert {r["stage"] for r in rows} >= set(STAGES) and rows[0]["bpc"] != "" and rows[-1]["bpc"] == ""
    assert (out / "swap.png").stat().st_size > 1000
    assert (out / "finetune.csv").read_text().startswith("model,norm,step,val_loss,accuracy,drift,kl\n")
    assert "factor" in (out / "calibration.csv").read_text().splitlines()[0]
    text = report.read_text()
    assert format_swap_table(result) in text and "Command: `normmatters reproduce swap`" in text
    assert "transformer, l1: val loss none" in text and not list(out.glob(".*.tmp"))
    back = read_swap_result(out)  # the written files give the result back (6 significant digits)
    assert [(r["model"], r["norm"], r["stage"]) for r in back.rows] == [
        (r["model"], r["norm"], r["stage"]) for r in result.rows]
    assert all(b["val_loss"] == pytest.approx(r["val_loss"], rel=1e-5) and b["steps_total"] == r["steps_total"]
               for b, r in zip(back.rows, result.rows, strict=True))
    assert len(back.curves) == len(result.curves) and len(back.calibration) == len(result.calibration)
    (out / "finetune.csv").unlink()
    with pytest.raises(FileNotFoundError, match="finetune.csv is missing"):
        read_swap_result(out)


@pytest.mark.parametrize("change, message", [
    ({"models": ("vit",)}, "models"), ({"norms": ("mean",)}, "does not divide"),
    ({"lm_steps": 0}, "lm_steps must be ≥ 1"), ({"cnn_finetune_steps": -1}, "cnn_finetune_steps must be ≥ 0"),
])
def test_bad_settings_are_named(change, message):
    with pytest.raises(ValueError, match=message):
        run_swap_study(SwapStudy(**change))
