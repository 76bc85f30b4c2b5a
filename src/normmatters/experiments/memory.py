"""Saved-activation memory: bytes autograd keeps for backward, measured with ``saved_tensors_hooks``.

Counts each distinct storage once (several saved views of one tensor share memory) and leaves out the
model's parameters (they exist anyway), so the number is the activation memory a training step holds between
forward and backward — what In-Place ABN (Rota Bulò et al. 2018) and the lean kernels reduce.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["saved_activation_bytes"]


def saved_activation_bytes(model: nn.Module, x: Tensor, y: Tensor) -> int:
    """Bytes of distinct non-parameter storages saved for backward by one training forward of ``model``."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        s = t.untyped_storage()
        ptr = s.data_ptr()
        if ptr not in param_ptrs and ptr != 0:
            seen[ptr] = max(seen.get(ptr, 0), s.nbytes())
        return t

    was_training = model.training
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = F.cross_entropy(model(x), y)
        del loss
    finally:
        model.load_state_dict(state)  # the forward updated running statistics; undo it
        model.train(was_training)
    return sum(seen.values())
