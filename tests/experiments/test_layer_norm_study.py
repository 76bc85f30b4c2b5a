"""The layer-norm study on a tiny corpus folder: every variant trains, the report and CSV are written, and the
l2 Lp layer tracks nn.LayerNorm."""

import csv
import subprocess
import sys

import pytest
import torch

from normmatters.experiments.layer_norm_study import (
    VARIANTS,
    CharTransformer,
    LayerNormStudy,
    format_layer_norm_table,
    read_corpus,
    run_layer_norm_study,
    write_layer_norm_report,
)


@pytest.fixture
def corpus(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.txt").write_text("the quick brown fox jumps over the lazy dog.\n" * 300)
    (d / "b.py").write_text("def f(x):\n    return x + 1\n" * 400)
    (d / "c.bin").write_bytes(b"\xff\xfe\x00" * 100)  # not UTF-8: skipped
    return d


def test_read_corpus_sorted_text_only(corpus):
    text = read_corpus(corpus, 10**6)
    assert text.startswith(b"the quick") and b"\xff" not in text and b"return x + 1" in text
    assert len(read_corpus(corpus, 12_000)) <= 12_001
    with pytest.raises(ValueError, match="is not a folder"):
        read_corpus(corpus / "missing", 10**6)
    (corpus / "a.txt").unlink(), (corpus / "b.py").unlink()
    with pytest.raises(ValueError, match="only 0 bytes"):
        read_corpus(corpus, 10**6)


def test_stdlib_is_the_default_corpus():
    assert b"def " in read_corpus(None, 50_000)


def test_study_runs_and_reports(corpus, tmp_path):
    study = LayerNormStudy(corpus=corpus, seeds=(0, 1), steps=4, width=32, heads=2, context=16, batch=4,
                           eval_batches=2)
    rows = run_layer_norm_study(study)
    assert len(rows) == 2 * len(VARIANTS)
    by = {(r["variant"], r["seed"]): r for r in rows}
    for seed in (0, 1):  # same seed, same data, same init: l2 is nn.LayerNorm up to rounding
        assert abs(by["LpLayerNorm l2", seed]["val_bpc"] - by["nn.LayerNorm", seed]["val_bpc"]) < 1e-3
    assert all(r["val_bpc"] > 0 and r["step_ms"] > 0 for r in rows)
    table = format_layer_norm_table(rows)
    assert "LpLayerNorm l1" in table and "LpRMSNorm l1" in table and "±" in table
    report = write_layer_norm_report(study, rows, tmp_path / "out")
    assert "| LpLayerNorm linf |" in report.read_text()
    with open(tmp_path / "out" / "results.csv") as fh:
        got = list(csv.DictReader(fh))
    assert len(got) == len(rows) and set(got[0]) == {"variant", "kind", "norm", "seed", "val_bpc", "train_loss",
                                                     "step_ms"}


def test_model_uses_the_chosen_norm():
    from normmatters.nn import LpRMSNorm
    m = CharTransformer("LpRMSNorm l1", 1, 16, 2, 8)
    assert isinstance(m.norm, LpRMSNorm) and m.norm.norm == "l1"
    assert m(torch.zeros(2, 8, dtype=torch.long)).shape == (2, 8, 256)
    with pytest.raises(ValueError, match="unknown variants"):
        run_layer_norm_study(LayerNormStudy(variants=("nn.BatchNorm",)))


def test_cli_reproduce_layer_norm(corpus, tmp_path):
    r = subprocess.run([sys.executable, "-m", "normmatters", "reproduce", "layer-norm", "--corpus", str(corpus),
                        "--steps", "2", "--seeds", "0", "--out", str(tmp_path / "cli")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "LpLayerNorm range" in r.stdout and (tmp_path / "cli" / "report.md").exists()


@pytest.mark.parametrize("variant", ["nn.LayerNorm", "nn.RMSNorm"])
def test_conversion_round_trip_on_the_transformer(variant):
    import normmatters as nm
    torch.manual_seed(0)
    model = CharTransformer(variant, 2, 32, 2, 16).eval()
    x = torch.randint(0, 256, (3, 16))
    ref = model(x)
    nm.convert_norms(model, norm="l2")
    assert sum(isinstance(m, (nm.LpLayerNorm, nm.LpRMSNorm)) for m in model.modules()) == 5
    torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=0)
    nm.to_torch_norms(model)
    assert not any(isinstance(m, (nm.LpLayerNorm, nm.LpRMSNorm)) for m in model.modules())
    torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=0)
