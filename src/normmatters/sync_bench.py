"""``normmatters bench --sync``: SyncLpBatchNorm2d step time and traffic on gloo ranks, side by side.

Spawns ``world`` CPU processes (gloo, one thread each); each times forward + backward of one layer on its own
(N, C, H, W) float32 shard, in interleaved rounds: every norm synced, the same layer unsynced
(``LpBatchNorm2d``, per-process statistics) and synced l2 (``nn.SyncBatchNorm`` refuses CPU tensors, so on CPU
our synced l2 is the synced batch norm to compare with). Reports medians of per-round ratios and, per layer and
step, the collectives run and the bytes each rank contributes (:func:`normmatters.kernels.sync.count_traffic`).
Timings on a shared machine are noisy; the ratios are measured side by side in one run.
"""

from __future__ import annotations

import datetime
import os
import socket
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .atomic_write import atomic_write
from .estimators import available_norms

__all__ = ["run_sync_benchmark", "format_sync_table"]

NORMS = tuple(available_norms())


def _step(layer, x, g) -> float:
    t0 = time.perf_counter()
    layer(x).backward(g)
    return time.perf_counter() - t0


def _worker(rank, world, port, shape, rounds, norms, out):
    from .kernels.sync import count_traffic
    from .nn import LpBatchNorm2d, SyncLpBatchNorm2d

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    torch.manual_seed(rank)
    C = shape[1]
    x = torch.randn(shape, requires_grad=True)
    g = torch.randn(shape)
    layers = {}
    for norm in norms:
        layers[(norm, "sync")] = SyncLpBatchNorm2d(C, norm=norm)  # top-k with the default k = 10
        layers[(norm, "local")] = LpBatchNorm2d(C, norm=norm)
    traffic = {}
    for norm in norms:  # warm-up, and the traffic of one step
        with count_traffic() as t:
            _step(layers[(norm, "sync")], x, g)
        traffic[norm] = t.log
        _step(layers[(norm, "local")], x, g)
    times = {key: [] for key in layers}
    for _ in range(rounds):
        for key, layer in layers.items():
            dist.barrier()
            times[key].append(_step(layer, x, g))
    result = {"times": times, "traffic": traffic}
    atomic_write(os.path.join(out, f"rank{rank}.pt"), lambda f: torch.save(result, f))  # read whole or not at all
    dist.destroy_process_group()


def run_sync_benchmark(world: int = 2, shape: tuple[int, ...] = (16, 64, 16, 16), rounds: int = 20,
                       norms: tuple[str, ...] = NORMS) -> dict:
    """Rows per norm: synced ms, unsynced ms, synced/unsynced, synced/synced-l2 (medians of per-round ratios over
    rank 0's rounds), forward and backward collectives, bytes per rank per step."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tempfile.mkdtemp(prefix="nm-sync-bench-")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, world, port, shape, rounds, tuple(norms), out))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(600)
    for p in procs:
        if p.is_alive():
            p.kill()
    path = os.path.join(out, "rank0.pt")
    if not os.path.exists(path):
        raise RuntimeError(f"sync benchmark: rank 0 produced no result (exit codes {[p.exitcode for p in procs]})")
    res = torch.load(path, weights_only=True)
    times, traffic = res["times"], res["traffic"]
    ref = times[("l2", "sync")] if "l2" in norms else None
    rows = []
    for norm in norms:
        sync, local = times[(norm, "sync")], times[(norm, "local")]
        log = traffic[norm]
        rows.append({
            "norm": norm,
            "sync_ms": 1e3 * statistics.median(sync),
            "local_ms": 1e3 * statistics.median(local),
            "sync_over_local": statistics.median(a / b for a, b in zip(sync, local)),
            "sync_over_sync_l2": statistics.median(a / b for a, b in zip(sync, ref)) if ref else None,
            "forward": [f"{op} {n} B" for op, phase, n in log if phase == "forward"],
            "backward": [f"{op} {n} B" for op, phase, n in log if phase == "backward"],
            "bytes": sum(n for _, _, n in log),
        })
    return {"world": world, "shape": list(shape), "rounds": rounds, "torch": torch.__version__, "rows": rows}


def format_sync_table(res: dict) -> str:
    lines = [f"SyncLpBatchNorm2d on {res['world']} gloo CPU ranks, float32 shard {tuple(res['shape'])} per rank, "
             f"{res['rounds']} interleaved rounds, torch {res['torch']} (forward + backward, one thread per rank)",
             "| norm | synced ms | unsynced ms | synced/unsynced | /synced l2 | forward collectives | "
             "backward collectives | bytes/rank/step |", "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        rel = "—" if r["sync_over_sync_l2"] is None else f"{r['sync_over_sync_l2']:.2f}"
        lines.append(f"| {r['norm']} | {r['sync_ms']:.2f} | {r['local_ms']:.2f} | {r['sync_over_local']:.2f} | {rel} "
                     f"| {', '.join(r['forward'])} | {', '.join(r['backward'])} | {r['bytes']} |")
    return "\n".join(lines)
