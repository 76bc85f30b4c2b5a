"""How the benchmark measures (normmatters.bench_measure): interleaved rounds, per-round ratios, the device
synchronised around every timing (CUDA, checked by standing in for torch.cuda), saved and peak bytes."""

import torch
from torch import nn

from normmatters import bench
from normmatters import bench_measure as M


def test_interleaved_calls_each_function_once_per_round_in_turn():
    calls = []
    fns = {k: (lambda k=k: calls.append(k)) for k in ("a", "b", "c")}
    times = M.interleaved(fns, rounds=3, device=torch.device("cpu"), warmup=1)
    assert calls == ["a", "b", "c"] + ["a", "b", "c"] * 3  # warm-up, then rounds in turn
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert all(t >= 0 for v in times.values() for t in v)


def test_ratio_is_the_median_of_per_round_ratios():
    times = {"a": [1.0, 2.0, 9.0], "b": [1.0, 1.0, 1.0]}
    assert M.ratio(times, "a", "b") == 2.0  # not mean(a) / mean(b) = 4
    assert M.median(iter([3.0, 1.0, 2.0])) == 2.0


class _FakeCuda:
    """Stands in for torch.cuda: records synchronisations and serves allocator counters."""

    def __init__(self):
        self.log = []

    def synchronize(self, device=None):
        self.log.append(("sync", device.type))

    def reset_peak_memory_stats(self, device=None):
        self.log.append(("reset", device.type))

    def memory_allocated(self, device=None):
        return 1000

    def max_memory_allocated(self, device=None):
        return 1800


def test_cuda_timings_wait_for_the_device(monkeypatch):
    fake = _FakeCuda()
    monkeypatch.setattr(torch, "cuda", fake)
    cuda = torch.device("cuda")
    M.sync_device(torch.device("cpu"))
    assert fake.log == []  # nothing to wait for on the CPU
    order = []
    fns = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    M.interleaved(fns, rounds=2, device=cuda, warmup=0)
    assert fake.log == [("sync", "cuda")] * 8  # before and after each of the 4 timed calls
    fake.log.clear()
    assert M.peak_bytes(lambda: None, cuda) == 800  # the allocator's peak above what was live before
    assert ("reset", "cuda") in fake.log and fake.log[-1] == ("sync", "cuda")


def test_copy_bandwidth_counts_read_and_write(monkeypatch):
    ticks = iter(range(100))
    monkeypatch.setattr(M.time, "perf_counter", lambda: next(ticks) * 0.5)  # every copy takes 0.5 s
    assert M.copy_bandwidth(torch.device("cpu"), nbytes=1 << 20, rounds=3) == 2 * (1 << 20) / 0.5


def test_saved_bytes_and_unique_saved_bytes():
    x = torch.randn(16, 32, requires_grad=True)
    w = torch.randn(32, 32, requires_grad=True)

    def twice():
        h = x @ w
        return (h @ w).sum()

    assert M.saved_bytes(lambda: nn.BatchNorm2d(4)(torch.randn(2, 4, 3, 3, requires_grad=True))) > 0
    assert M.saved_bytes(twice) > M.unique_saved_bytes(twice) == (16 * 32 + 16 * 32 + 32 * 32) * 4


def test_cpu_peak_bytes_sees_an_allocation():
    n = 1 << 20
    assert M.peak_bytes(lambda: torch.ones(n), torch.device("cpu")) >= 4 * n


def test_names_stay_importable_from_bench():
    assert bench.saved_bytes is M.saved_bytes and bench.peak_bytes is M.peak_bytes
    assert bench.copy_bandwidth is M.copy_bandwidth and bench.unique_saved_bytes is M.unique_saved_bytes
    assert bench._interleaved is M.interleaved and bench._ratio is M.ratio and bench._sync is M.sync_device
