from __future__ import annotations

import torch

from normmatters.experiments.batches import iterate_batches


def test_workers_give_the_same_batches_in_order(tiny):
    g = torch.Generator().manual_seed(0)
    batches = [torch.randperm(len(tiny.train), generator=g)[:16] for _ in range(4)]
    plain = list(iterate_batches(tiny.train, batches))
    pooled = list(iterate_batches(tiny.train, batches, workers=2))
    assert len(plain) == len(pooled) == 4
    for (x, y), (px, py), idx in zip(plain, pooled, batches):
        assert torch.equal(x, tiny.train.images[idx]) and torch.equal(y, tiny.train.labels[idx])
        assert torch.equal(x, px) and torch.equal(y, py)
