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

__all__ = ["capture_rng_state", "restore_rng_state", "check_rng_state"]


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


def _need(ok: bool, where: str, expected: str, found: Any) -> None:
    if not ok:
        shown = f"a tensor of {found.dtype} and shape {tuple(found.shape)}" if isinstance(found, torch.Tensor) \
            else f"{found!r}"[:80] + f" ({type(found).__name__})"
        raise ValueError(f"{where} must be {expected}, found {shown}")


def _byte_state(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.dim() == 1 and t.numel() > 0


def _int(v: Any, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def check_rng_state(state: Any, where: str = "rng") -> None:
    """Raise ValueError naming the entry (``rng[0].numpy.pos``) unless ``state`` has the shape
    :func:`capture_rng_state` gives: every stream present (none None), byte tensors, 624 Mersenne-Twister keys,
    a position in 0..624, 625 Python state words."""
    _need(isinstance(state, dict), where, "a dict of random states", state)
    for key in ("torch", "cuda", "numpy", "python", "augment"):
        _need(key in state and state[key] is not None, f"{where}.{key}", "present", state.get(key))
    _need(_byte_state(state["torch"]), f"{where}.torch", "a 1-d uint8 tensor", state["torch"])
    _need(_byte_state(state["augment"]), f"{where}.augment", "a 1-d uint8 tensor", state["augment"])
    _need(isinstance(state["cuda"], list | tuple) and all(_byte_state(t) for t in state["cuda"]), f"{where}.cuda",
          "a list of 1-d uint8 tensors", state["cuda"])
    n = state["numpy"]
    _need(isinstance(n, dict), f"{where}.numpy", "a dict", n)
    _need(n.get("name") == "MT19937", f"{where}.numpy.name", "'MT19937'", n.get("name"))
    key = n.get("key")
    _need(isinstance(key, torch.Tensor) and not key.is_floating_point() and tuple(key.shape) == (624,),
          f"{where}.numpy.key", "624 integers", key)
    _need(_int(n.get("pos"), 0, 624), f"{where}.numpy.pos", "an int in 0..624", n.get("pos"))
    _need(_int(n.get("has_gauss"), 0, 1), f"{where}.numpy.has_gauss", "0 or 1", n.get("has_gauss"))
    _need(isinstance(n.get("cached_gaussian"), float), f"{where}.numpy.cached_gaussian", "a float",
          n.get("cached_gaussian"))
    p = state["python"]
    _need(isinstance(p, dict), f"{where}.python", "a dict", p)
    _need(_int(p.get("version"), 0, 2**31), f"{where}.python.version", "an int", p.get("version"))
    words = p.get("state")
    _need(isinstance(words, list | tuple) and len(words) == 625 and all(_int(w, 0, 2**32) for w in words),
          f"{where}.python.state", "625 ints in 0..2**32", words)
    _need(p.get("gauss") is None or isinstance(p.get("gauss"), float), f"{where}.python.gauss", "a float or None",
          p.get("gauss"))
