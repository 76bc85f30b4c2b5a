"""Data-parallel helpers: process-group setup from torchrun's environment, DDP wrapping, small collectives.

``torchrun --nproc_per_node=N -m normmatters train …`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/
``MASTER_ADDR``/``MASTER_PORT``; :func:`init_from_env` joins the group (gloo on CPU, NCCL on CUDA). Without
those variables everything runs as a single process (:data:`SINGLE`).

Normalization statistics across ranks: :func:`prepare_norm_layers`. ``sync_norm="none"`` keeps per-rank batch
statistics (each rank normalizes its own B/N samples, like ghost batch norm); ``"torch"`` converts stock
``nn.BatchNorm`` layers to ``nn.SyncBatchNorm`` (Lp layers are left alone); ``"lp"`` makes every Lp layer a
:class:`normmatters.nn.SyncLpBatchNorm` (the statistics of every rank's batch together, exactly); ``"auto"`` syncs
whatever norm the model uses: Lp layers as ``"lp"``, stock ``nn.BatchNorm`` as ``nn.SyncBatchNorm`` on CUDA and as
``SyncLpBatchNorm(norm="l2")`` — the same math — on CPU, where ``nn.SyncBatchNorm`` refuses CPU tensors. Running
buffers are
broadcast from rank 0 before evaluation and checkpointing (:func:`broadcast_buffers`) so every rank evaluates
and saves the same model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..convert import convert_batchnorm, convert_sync_lp_batchnorm

__all__ = [
    "DistInfo",
    "SINGLE",
    "init_from_env",
    "env_int",
    "current",
    "wrap_model",
    "unwrap",
    "prepare_norm_layers",
    "broadcast_buffers",
    "all_reduce_mean",
    "all_gather_objects",
    "any_rank",
    "barrier",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size``; ``is_main`` writes files."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


SINGLE = DistInfo()


def current() -> DistInfo:
    """The running process group's info, or :data:`SINGLE`."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), env_int("LOCAL_RANK", 0))
    return SINGLE


def env_int(name: str, default: int, lo: int = 0) -> int:
    """The int in environment variable ``name`` (``default`` when unset or empty); a ValueError naming the
    variable, its value and what is expected otherwise."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = lo - 1
    if value < lo:
        raise ValueError(f"environment variable {name} must be an int ≥ {lo}, got {text!r}")
    return value


def init_from_env(device: str = "cpu") -> DistInfo:
    """Join the process group described by torchrun's environment variables (no-op when absent)."""
    world = env_int("WORLD_SIZE", 1, lo=1)
    if world <= 1:
        return current()
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
    info = current()
    if device.startswith("cuda"):
        torch.cuda.set_device(info.local_rank)
    return info


#: ``--sync-norm`` values: none, torch (nn.SyncBatchNorm), lp (synced Lp layers), auto (sync whatever the model uses)
SYNC_NORM_MODES = ("none", "torch", "lp", "auto")


def prepare_norm_layers(model: nn.Module, sync_norm: str, info: DistInfo,
                        device: torch.device | str = "cpu") -> nn.Module:
    """Cross-rank normalization statistics for ``model`` (see the module docstring); ``device``: where the model
    will train (decides what ``"auto"`` makes of stock ``nn.BatchNorm``)."""
    if sync_norm not in SYNC_NORM_MODES:
        raise ValueError(f"sync_norm must be one of {SYNC_NORM_MODES}, got {sync_norm!r}")
    match sync_norm:
        case _ if not info.active:
            return model
        case "none":
            return model
        case "torch":
            return nn.SyncBatchNorm.convert_sync_batchnorm(model)
        case "lp":
            return convert_sync_lp_batchnorm(model)
    # auto: the Lp layers synced; stock nn.BatchNorm as nn.SyncBatchNorm on CUDA, as synced l2 (the same maths)
    # on CPU, where nn.SyncBatchNorm refuses CPU tensors
    model = convert_sync_lp_batchnorm(model)
    if torch.device(device).type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return convert_batchnorm(model, norm="l2", sync=True)


def wrap_model(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """``DistributedDataParallel`` when running on several ranks, else ``model`` unchanged."""
    if not info.active:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def broadcast_buffers(model: nn.Module, info: DistInfo) -> None:
    """Copy rank 0's buffers (running statistics) to every rank."""
    if info.active:
        for b in unwrap(model).buffers():
            dist.broadcast(b, 0)


def all_reduce_mean(values: Tensor, info: DistInfo) -> Tensor:
    """Mean of ``values`` over ranks (returned as a new tensor on ``values``' device)."""
    if not info.active:
        return values
    out = values.detach().clone()
    dist.all_reduce(out)
    return out / info.world_size


def any_rank(flag: bool, info: DistInfo, device: torch.device | str = "cpu") -> bool:
    """True if ``flag`` is true on any rank (a collective; NCCL needs a CUDA ``device``)."""
    if not info.active:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, …]`` on every rank."""
    if not info.active:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.active:
        dist.barrier()
