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
    Scaled,
    format_layer_norm_table,
    parse_variant,
    read_corpus,
    run_layer_norm_study,
    variant_name,
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
    assert len(got) == len(rows) and set(got[0]) == {"variant", "kind", "norm", "precision", "scale", "seed",
                                                     "val_bpc", "train_loss", "step_ms", "act_rms", "act_max"}


def test_model_uses_the_chosen_norm():
    from normmatters.nn import LpRMSNorm
    m = CharTransformer("LpRMSNorm l1", 1, 16, 2, 8)
    assert isinstance(m.norm, LpRMSNorm) and m.norm.norm == "l1"
    assert m(torch.zeros(2, 8, dtype=torch.long)).shape == (2, 8, 256)
    with pytest.raises(ValueError, match="unknown variants"):
        run_layer_norm_study(LayerNormStudy(variants=("nn.BatchNorm",)))
    with pytest.raises(ValueError, match="unknown variants"):
        run_layer_norm_study(LayerNormStudy(precisions=("fp12",)))
    with pytest.raises(ValueError, match="bad scales"):
        run_layer_norm_study(LayerNormStudy(precisions=("fp16",), scales=(0.0,)))


def test_variant_names_parse_to_precision_and_scale():
    assert parse_variant("LpLayerNorm l1") == ("layer", "l1", None, 1.0)
    assert parse_variant("nn.RMSNorm") == ("rms", None, None, 1.0)
    assert parse_variant(variant_name("LpRMSNorm l2", "fp16", 128)) == ("rms", "l2", "fp16", 128.0)
    assert parse_variant("LpLayerNorm range fp8_e4m3") == ("layer", "range", "fp8_e4m3", 1.0)
    for bad in ("LpLayerNorm l1 fp12", "LpLayerNorm l1 fp16 256", "LpLayerNorm l1 fp16 x0", "nn.LayerNorm fp16"):
        with pytest.raises(ValueError, match="unknown variant"):
            parse_variant(bad)
    m = CharTransformer("LpLayerNorm l2 fp16 x128", 1, 16, 2, 8)
    assert isinstance(m.norm, Scaled) and m.norm.scale == 128 and m.norm.norm.precision == "fp16"


def test_emulated_variants_at_a_pushed_scale(corpus, tmp_path):
    """fp16 at ×256 (RMS of x − μ ≈ 1.4 at init → Σd² far past 65504): the l2 layers collapse to their bias, so
    the emulated l2 model ignores its input, while l1 at the same scale trains like the native layer."""
    study = LayerNormStudy(corpus=corpus, seeds=(0, 1), steps=6, width=32, heads=2, context=16, batch=4,
                           eval_batches=2, variants=("nn.LayerNorm", "LpLayerNorm l1"), precisions=("fp16",),
                           scales=(1.0, 256.0), emulated=("LpLayerNorm l2", "LpLayerNorm l1"), emulated_seeds=(1,),
                           eval_every=2, curve_batches=1)
    rows = run_layer_norm_study(study)
    assert [r["variant"] for r in rows if r["seed"] == 0] == ["nn.LayerNorm", "LpLayerNorm l1"]
    by = {r["variant"]: r for r in rows if r["seed"] == 1}
    assert set(by) == {"nn.LayerNorm", "LpLayerNorm l1", "LpLayerNorm l2 fp16", "LpLayerNorm l1 fp16",
                       "LpLayerNorm l2 fp16 x256", "LpLayerNorm l1 fp16 x256"}
    assert [s for s, _ in by["LpLayerNorm l1 fp16"]["curve"]] == [2, 4, 6]
    assert by["LpLayerNorm l2 fp16 x256"]["precision"] == "fp16" and by["LpLayerNorm l2 fp16 x256"]["scale"] == 256
    assert abs(by["LpLayerNorm l1 fp16 x256"]["val_bpc"] - by["LpLayerNorm l1"]["val_bpc"]) < 0.05
    # collapsed: the model's output no longer depends on the tokens
    torch.manual_seed(1)
    m = CharTransformer("LpLayerNorm l2 fp16 x256", 1, 32, 2, 16)
    a, b = m(torch.zeros(1, 16, dtype=torch.long)), m(torch.full((1, 16), 7, dtype=torch.long))
    assert torch.equal(a, b)
    report = write_layer_norm_report(study, rows, tmp_path / "emu", command="normmatters reproduce layer-norm")
    text = report.read_text()
    assert "| LpLayerNorm l2 fp16 x256 | 1 |" in text and "Command: `normmatters reproduce layer-norm`" in text
    assert "![curves-LpLayerNorm-l2](curves-LpLayerNorm-l2.png)" in text
    for name in ("curves.csv", "curves-native.png", "curves-LpLayerNorm-l1.png", "curves-LpLayerNorm-l2.png"):
        assert (tmp_path / "emu" / name).stat().st_size > 0


def test_cli_reproduce_layer_norm(corpus, tmp_path):
    r = subprocess.run([sys.executable, "-m", "normmatters", "reproduce", "layer-norm", "--corpus", str(corpus),
                        "--steps", "2", "--seeds", "0", "--out", str(tmp_path / "cli")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "LpLayerNorm range" in r.stdout and (tmp_path / "cli" / "report.md").exists()


def test_cli_reproduce_layer_norm_emulated(corpus, tmp_path):
    r = subprocess.run([sys.executable, "-m", "normmatters", "reproduce", "layer-norm", "--corpus", str(corpus),
                        "--steps", "2", "--seeds", "0", "--variants", "nn.LayerNorm", "--precision", "bf16",
                        "--scale", "1", "64", "--emulate", "LpLayerNorm l1", "--eval-every", "1", "--context", "16",
                        "--batch", "4", "--out", str(tmp_path / "cli")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "LpLayerNorm l1 bf16 x64" in r.stdout and "LpLayerNorm range" not in r.stdout
    text = (tmp_path / "cli" / "report.md").read_text()
    assert "--precision bf16 --scale 1 64" in text and "context 16" in text
    assert (tmp_path / "cli" / "curves-LpLayerNorm-l1.png").exists()


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
