from __future__ import annotations

from normmatters.cli import main


def test_compare_writes_report_and_prints_table(tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = main(
        [
            "compare",
            "--norms",
            "bn",
            "l1",
            "--seeds",
            "2",
            "--epochs",
            "1",
            "--model",
            "mlp",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert f"writing to {out}/" in text
    assert "| bn | 2 |" in text and "| l1 | 2 |" in text and "1.00×" in text
    assert {"report.md", "runs.csv", "runs.jsonl", "summary.csv", "loss.png", "accuracy.png"} <= {
        p.name for p in out.iterdir()
    }
    assert "| l1 | 2 |" in (out / "report.md").read_text()


def test_compare_bad_dataset(tmp_path, capsys):
    rc = main(["compare", "--dataset", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert rc == 2 and "--dataset: expected digits, idx:DIR" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before anything was created
