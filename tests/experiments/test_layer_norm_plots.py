"""layer_norm_plots: curves.csv round trip, seed bands over the common steps, one PNG per emulated layer."""

from normmatters.experiments.layer_norm_plots import curve_bands, plot_curves, read_curves_csv, write_curves_csv


def _row(variant, seed, curve, precision="native", kind="layer"):
    return {"variant": variant, "seed": seed, "curve": curve, "precision": precision, "kind": kind}


ROWS = [
    _row("nn.LayerNorm", 0, [(5, 6.0), (10, 5.0)]),
    _row("nn.LayerNorm", 1, [(5, 6.4), (10, 5.2)]),
    _row("nn.LayerNorm", 2, [(5, 5.9), (10, 4.9), (15, 4.0)]),  # a step the other seeds lack
    _row("LpRMSNorm l1", 0, [(5, 6.1), (10, 5.1)], kind="rms"),
    _row("LpLayerNorm l1 fp16 x256", 0, [(5, 6.2), (10, 5.3)], precision="fp16"),
    _row("LpLayerNorm l1 fp8_e4m3", 0, [(5, 6.5), (10, 5.9)], precision="fp8_e4m3"),
]


def test_curve_bands_mean_min_max_over_seeds_at_common_steps():
    steps, mean, lo, hi = curve_bands(ROWS, "nn.LayerNorm")
    assert steps == [5, 10]
    assert [round(m, 6) for m in mean] == [round((6.0 + 6.4 + 5.9) / 3, 6), round((5.0 + 5.2 + 4.9) / 3, 6)]
    assert lo == [5.9, 4.9] and hi == [6.4, 5.2]
    assert curve_bands(ROWS, "missing") == ([], [], [], [])


def test_curves_csv_round_trip(tmp_path):
    got = read_curves_csv(write_curves_csv(ROWS, tmp_path / "curves.csv"))
    assert got[("nn.LayerNorm", 2)] == [(5, 5.9), (10, 4.9), (15, 4.0)]
    assert len(got) == len(ROWS)


def test_plots_native_overview_and_one_per_emulated_layer(tmp_path):
    paths = plot_curves(ROWS, tmp_path)
    assert [p.name for p in paths] == ["curves-native.png", "curves-LpLayerNorm-l1.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
