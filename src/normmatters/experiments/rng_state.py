"""Every random-number state a run depends on, as tensors, numbers and lists.

A checkpoint must load with ``torch.load(weights_only=True)`` (no Python objects), so the numpy state
(``np.random.get_state()``: name, 624 uint32 keys, position, Gaussian cache) and the Python state
(``random.getstate()``: version, 625 ints, Gaussian cache) are stored as a dict of a tensor and plain numbers /
lists, and rebuilt exactly on restore.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = ["capture_rng_state", "restore_rng_state"]


def capture_rng_state(gen: torch.Generator) -> dict[str, Any]:
    """Every random state as tensors, numbers and lists (a checkpoint must load with ``weights_only=True``)."""
    np_name, np_key, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": str(np_name), "key": torch.from_numpy(np_key.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "python": {"version": int(py_version), "state": [int(v) for v in py_state], "gauss": py_gauss},
        "augment": gen.get_state(),
    }


def restore_rng_state(state: dict[str, Any], gen: torch.Generator) -> None:
    """Set every stream from :func:`capture_rng_state`'s dict (its tensors may have been loaded onto a GPU by a
    ``map_location``: RNG states are set from CPU tensors)."""
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.cpu() for t in state["cuda"]])
    n = state["numpy"]
    np.random.set_state((n["name"], n["key"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    gen.set_state(state["augment"].cpu())
