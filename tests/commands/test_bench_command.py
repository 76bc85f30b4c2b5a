"""``normmatters bench`` (normmatters.commands.bench): what it passes to the benchmark (device included) and what
it prints and writes, with the benchmark itself stood in for (the real run: tests/test_bench.py)."""

import json
import re
import subprocess
import sys

import pytest

from normmatters import bench, sync_bench
from normmatters.cli import main


def _result(**kw):
    res = {"device": kw.get("device", "cpu"), "torch": "x", "threads": 2, "copy_bandwidth_GBps": 30.0,
           "copy_bandwidth_samples_GBps": [28.0, 30.0], "table": "| the table |",
           "resnet20_step_ratio": {"bn_ms": 12.0, "step": {"l1": 0.9}, "saved": {"l1": 1.0}},
           "compile_seconds": {"forward/l1/torch.float32/cpu": 1.5}, "native_first_call": (0.2, "cached"),
           "seconds": 3.0, "rows": []}
    return res


@pytest.fixture
def calls(monkeypatch):
    seen = []

    def fake(**kw):
        seen.append(kw)
        return _result(**kw)
    monkeypatch.setattr(bench, "run_benchmark", fake)
    import torch  # the command refuses a device the machine lacks: pretend this one has a GPU

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    return seen


def _code(argv: list[str]) -> int:
    """main's exit code: it returns it for a flag refused by its own type too (argparse's SystemExit caught)."""
    return main(argv)


def test_bad_settings_are_refused_before_the_benchmark(calls, capsys, monkeypatch):
    import torch

    for flags, message in ((["--rounds", "0"], "--rounds: expected an int in 1 .. 100000, got '0'"),
                           (["--norms", "l3"], "--norms: expected one of l2, .*got 'l3'"),
                           (["--device", "bogus"], "--device: expected a torch device"),
                           (["--device", "cuda:3"], r"--device: expected cuda:0 .. cuda:0 \(this machine's GPUs\)"),
                           (["--layers", "--norms", "mean"], "--norms: expected with --layers, one of"),
                           (["--json", "/proc/x.json"], "--json: expected a file outside /proc")):
        assert _code(["bench", "--quick", *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith("bench: ") and err.count("\n") == 1 and re.search(message, err), (flags, err)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _code(["bench", "--device", "cuda"]) == 2
    assert "--device: expected cpu (CUDA is not available on this machine), got 'cuda'" in capsys.readouterr().err
    assert calls == []


def test_arguments_reach_the_benchmark(calls):
    assert main(["bench", "--quick", "--device", "cuda", "--norms", "l1", "range", "--rounds", "3",
                 "--no-resnet"]) == 0
    assert calls == [{"quick": True, "device": "cuda", "norms": ["l1", "range"], "rounds": 3, "resnet": False}]
    calls.clear()
    assert main(["bench"]) == 0
    assert calls[0]["device"] == "cpu" and tuple(calls[0]["norms"]) == bench.NORMS and calls[0]["rounds"] is None


def test_prints_device_table_resnet_and_first_call_costs(calls, capsys):
    main(["bench", "--device", "cuda"])
    out = capsys.readouterr().out
    assert out.startswith("device cuda, torch x, 2 threads, memory copy bandwidth 30.0 GB/s (readings "
                          "before/after: 28.0/30.0)")
    assert "| the table |" in out and "SGD step vs nn.BatchNorm2d (12 ms)" in out and "| l1 | 0.90 | 1.00 |" in out
    assert "native kernels: library cached and loaded in 0.20 s" in out
    assert "first-call (compile) seconds: forward/l1/torch.float32/cpu 1.5" in out


def test_json_holds_the_result(calls, tmp_path):
    out = tmp_path / "sub" / "b.json"
    out.parent.mkdir()
    main(["bench", "--quick", "--json", str(out)])
    assert json.loads(out.read_text())["table"] == "| the table |"


def test_sync_runs_the_synced_benchmark(monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(sync_bench, "run_sync_benchmark", lambda **kw: seen.append(kw) or {"rows": []})
    monkeypatch.setattr(sync_bench, "format_sync_table", lambda res: "| sync table |")
    assert main(["bench", "--sync", "--quick", "--norms", "l1"]) == 0
    assert seen == [{"norms": ("l1",), "rounds": 10}]
    assert "| sync table |" in capsys.readouterr().out
    main(["bench", "--sync"])
    assert seen[-1] == {"norms": tuple(sync_bench.NORMS), "rounds": 30}


def test_bench_layers_quick_prints_the_table():
    # the real run, on small shapes: the table of ratios per layer kind and norm
    r = subprocess.run([sys.executable, "-m", "normmatters", "bench", "--layers", "--quick", "--eager-only",
                        "--norms", "l1", "--rounds", "2"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    for stock in ("nn.LayerNorm 256×192", "nn.RMSNorm 256×192", "nn.GroupNorm 4×64×8×8"):
        assert stock in r.stdout
    assert r.stdout.count("| l1 |") == 3
