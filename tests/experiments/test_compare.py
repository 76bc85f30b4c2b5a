from __future__ import annotations

import torch

from normmatters.experiments.compare import CompareConfig, run_compare, time_side_by_side
from normmatters.experiments.trainer import Trainer


def test_time_side_by_side_steps_every_model_on_the_same_batches(tiny):
    cfg = CompareConfig(norms=("bn", "l1"), seeds=(0,), epochs=1, model="mlp")
    trainers = {n: Trainer(cfg.train_config(n, 0), data=tiny) for n in cfg.norms}
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in trainers}
    for n, t in trainers.items():
        step = t._train_step

        def record(x, y, _n=n, _step=step):
            seen[_n].append(y.clone())
            return _step(x, y)

        t._train_step = record
    out = time_side_by_side(trainers, tiny, batch_size=16, rounds=5, warmup=2)
    assert set(out) == {"bn", "l1"} and out["bn"][1] == 1.0 and out["l1"][0] > 0 and out["l1"][1] > 0
    assert len(seen["bn"]) == len(seen["l1"]) == 7
    assert all(torch.equal(a, b) for a, b in zip(seen["bn"], seen["l1"]))


def test_run_compare_records_side_by_side_times(tiny):
    res = run_compare(CompareConfig(norms=("l1", "bn"), seeds=(0,), epochs=1, model="mlp", batch_size=64), data=tiny,
                      timing_rounds=4)
    assert [r.norm for r in res] == ["l1", "bn"]
    by = {r.norm: r for r in res}
    assert by["bn"].step_ratio == 1.0 and by["l1"].step_ratio > 0 and len(by["l1"].epochs) == 1
