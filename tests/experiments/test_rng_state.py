from __future__ import annotations

import io
import random

import numpy as np
import torch

from normmatters.experiments.rng_state import capture_rng_state, restore_rng_state


def _draws(gen):
    return (torch.rand(3).tolist(), np.random.rand(3).tolist(), np.random.randn(1).tolist(), random.random(),
            random.gauss(0, 1), torch.rand(2, generator=gen).tolist())


def test_roundtrip_through_a_weights_only_load():
    gen = torch.Generator().manual_seed(5)
    np.random.randn()  # leave a cached Gaussian in numpy's state
    random.gauss(0, 1)
    buf = io.BytesIO()
    torch.save(capture_rng_state(gen), buf)
    expected = _draws(gen)
    _draws(gen)  # move every stream on
    buf.seek(0)
    restore_rng_state(torch.load(buf, weights_only=True), gen)
    assert _draws(gen) == expected
