"""The swap study's files from a hand-made result (no training): the CSVs read back as written, the printed table
names every row, a CSV without the result columns is refused naming the file."""

import pytest

from normmatters.experiments.swap_report import format_swap_table, read_swap_result, write_swap_report
from normmatters.experiments.swap_study import RESULT_COLUMNS, SwapResult, SwapStudy


def _result() -> SwapResult:
    rows = []
    for norm, stage, loss in (("torch", "original", 1.5), ("l1", "none", 1.75), ("l1", "calibrated", 1.625)):
        row = dict.fromkeys(RESULT_COLUMNS, 0.0)
        row.update(model="transformer", norm=norm, stage=stage, val_loss=loss, drift=0.25, seconds=2.0)
        rows.append(row)
    curves = [{"model": "transformer", "norm": "l1", "step": s, "val_loss": 1.7 - s / 100, "accuracy": 0.5,
               "drift": 0.1, "kl": 0.01} for s in (0, 10)]
    calibration = [{"model": "transformer", "norm": "l1", "layer": "ln", "class": "LpLayerNorm", "factor": 0.98,
                    "drift_before": 0.2, "drift_after": 0.1, "calibrated": True}]
    return SwapResult(rows, curves, {"transformer": 2.0}, calibration)


def test_written_files_read_back_and_the_table_names_every_row(tmp_path):
    result = _result()
    report = write_swap_report(SwapStudy(), result, tmp_path, command="normmatters reproduce swap")
    assert report.name == "report.md" and (tmp_path / "swap.png").stat().st_size > 0
    back = read_swap_result(tmp_path)
    assert [(r["norm"], r["stage"], r["val_loss"]) for r in back.rows] == [
        ("torch", "original", 1.5), ("l1", "none", 1.75), ("l1", "calibrated", 1.625)]
    assert back.base_seconds == {"transformer": 2.0} and back.calibration[0]["factor"] == 0.98
    table = format_swap_table(result)
    assert "| transformer | l1 | calibrated |" in table and "| transformer | l1 | none |" in table


def test_a_folder_without_the_result_columns_is_refused(tmp_path):
    for name in ("results", "finetune", "calibration"):
        (tmp_path / f"{name}.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="results.csv lacks the columns"):
        read_swap_result(tmp_path)
    (tmp_path / "finetune.csv").unlink()
    with pytest.raises(FileNotFoundError, match="finetune.csv is missing"):
        read_swap_result(tmp_path)
