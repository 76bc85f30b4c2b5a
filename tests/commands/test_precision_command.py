from __future__ import annotations

from normmatters.cli import main


def test_precision_writes_into_runs_by_default(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc = main(["precision", "--formats", "fp16", "--norms", "l2", "l1", "--dists", "gaussian", "--n-min", "6",
               "--n-max", "8", "--scale-min", "-8", "--scale-max", "8", "--scale-step", "8"])
    assert rc == 0
    (out,) = (tmp_path / "runs").iterdir()
    assert out.name.startswith("precision-")
    assert sorted(p.name for p in out.iterdir()) == ["precision.csv", "precision_fp16.png"]
    text = capsys.readouterr().out
    assert f"CSV: {out.relative_to(tmp_path)}/precision.csv" in text and "| fp16 | l1 |" in text
    header = (out / "precision.csv").read_text().splitlines()[0]
    assert header.startswith("format,norm,dist")
