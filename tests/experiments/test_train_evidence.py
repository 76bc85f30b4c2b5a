"""The training evidence behind ``normmatters precision --train``: an emulated fp16 l2 layer diverges at large
activations where l1 does not."""

from normmatters.experiments.train_evidence import TrainResult, evidence_table, load_digits_split, train_one


def test_training_evidence_l2_fp16_fails_at_large_activations_l1_does_not():
    # fp16 l2 at x32: Σd² overflows, every emulated output is its bias; the network stays at chance, with a
    # finite loss (a constant channel no longer gives a NaN gradient)
    data = load_digits_split()
    bad = train_one("l2", "fp16", input_scale=32.0, epochs=1, data=data)
    good = train_one("l1", "fp16", input_scale=32.0, epochs=1, data=data)
    assert bad.test_acc < 0.2 and not bad.diverged
    assert not good.diverged and good.test_acc > 0.8


def test_evidence_table_has_a_cell_per_precision_and_marks_divergence():
    rows = [TrainResult("l2", "fp16", 32.0, 0.1, float("nan"), 3, 10), TrainResult("l2", "fp32", 32.0, 0.9, 0.2, 0, 10),
            TrainResult("l1", "fp16", 32.0, 0.85, 0.3, 0, 10)]
    lines = evidence_table(rows).splitlines()
    assert lines[0] == "| input scale | norm | fp16 | fp32 |"
    assert lines[2] == "| ×32 | l2 | 0.100 (diverged 3/10) | 0.900 |"
    assert lines[3] == "| ×32 | l1 | 0.850 |  |"
