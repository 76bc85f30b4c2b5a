"""Checkpoint and resume plumbing of :class:`~normmatters.experiments.trainer.Trainer`: what a checkpoint
holds, which config changes a resume accepts, and writing / reading it (rank 0 writes; every rank restores its
own RNG streams).

The state (``TrainerState.state_dict``): format version, config, position (epoch, step in epoch, global step),
model, optimizer, scheduler, every rank's RNG states (global torch / CUDA / numpy / python and the rank's
augmentation generator), world size, the partial-epoch accumulators, the epoch history and the weight-decay
tools' state. ``load_state_dict`` refuses a checkpoint of another world size or of a config that differs in
anything but :data:`RESUMABLE_CHANGES`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from . import distributed as D
from .checkpoint import CHECKPOINT_VERSION, CheckpointError, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .metrics import METRICS_FILES
from .optim import describe_length_change
from .rng_state import capture_rng_state, check_rng_state, restore_rng_state

__all__ = ["CHECKPOINT_NAME", "RESUMABLE_CHANGES", "TrainerState"]

log = logging.getLogger("normmatters.experiments.trainer")

CHECKPOINT_NAME = "checkpoint.pt"
#: config keys that may differ between a checkpoint and the run resuming it
RESUMABLE_CHANGES = frozenset({"epochs", "workers", "threads", "log_every", "checkpoint_every"})


class TrainerState:
    """The checkpoint side of a Trainer (a mixin: the Trainer sets every attribute it reads — ``cfg``, ``out``,
    ``info``, ``device``, ``model``, ``optimizer``, ``scheduler``, ``generator``, ``wd_tools``,
    ``steps_per_epoch``, the position counters, ``history``, ``_acc`` and ``_writer``)."""

    @property
    def checkpoint_path(self) -> Path | None:
        return self.out / CHECKPOINT_NAME if self.out is not None else None

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly (collective under DDP: every rank must call it)."""
        D.broadcast_buffers(self.model, self.info)
        return {
            "version": CHECKPOINT_VERSION,
            "config": self.cfg.to_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "model": D.unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": D.all_gather_objects(capture_rng_state(self.generator), self.info),
            "world_size": self.info.world_size,
            "epoch_accumulators": dict(self._acc),
            "history": list(self.history),
            "wd_tools": self.wd_tools.state_dict(),
        }

    def check_state(self, state: dict[str, Any], source: str = "checkpoint") -> None:
        """Raise :class:`CheckpointError` naming the entry unless every value ``state`` holds can be: the parts
        are of the right kind, the position counters agree with each other and with this run's steps per epoch,
        the epoch history lists epochs 1..epoch, every random state is complete, and counters in the model and
        optimizer state (``num_batches_tracked``, ``step``) are non-negative."""

        def bad(what: str, expected: str, found: Any) -> CheckpointError:
            return CheckpointError(f"{source}: {what} must be {expected}, found {found!r}"[:400]
                                   + "; it was not loaded and is left as it is")

        for key in ("config", "model", "optimizer", "scheduler"):
            if not isinstance(state.get(key), dict):
                raise bad(key, "a dict", type(state.get(key)).__name__)
        for key in ("epoch", "step_in_epoch", "global_step"):
            v = state[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise bad(key, "an int ≥ 0", v)
        epoch, step, total = state["epoch"], state["step_in_epoch"], state["global_step"]
        if step >= self.steps_per_epoch:
            raise bad("step_in_epoch", f"below the {self.steps_per_epoch} steps of an epoch", step)
        if total != epoch * self.steps_per_epoch + step:
            raise bad("global_step", f"epoch × {self.steps_per_epoch} steps + step_in_epoch = "
                      f"{epoch * self.steps_per_epoch + step}", total)
        history = state.get("history", [])
        if not isinstance(history, list) or not all(isinstance(r, dict) for r in history) or \
                [r.get("epoch") for r in history] != list(range(1, epoch + 1)):
            raise bad("history", f"one record per finished epoch (1..{epoch})",
                      [r.get("epoch") if isinstance(r, dict) else r for r in history]
                      if isinstance(history, list) else history)
        acc = state.get("epoch_accumulators", {"loss": 0.0, "correct": 0, "count": 0})
        if not (isinstance(acc, dict) and set(acc) == {"loss", "correct", "count"}
                and all(isinstance(acc[k], int | float) and not isinstance(acc[k], bool) for k in acc)
                and acc["loss"] >= 0 and 0 <= acc["correct"] <= acc["count"]):  # NaN fails too
            raise bad("epoch_accumulators", "{loss ≥ 0, 0 ≤ correct ≤ count}", acc)
        rng = state["rng"]
        if not isinstance(rng, list) or len(rng) != state["world_size"]:
            raise bad("rng", f"a list of {state['world_size']} per-rank random states",
                      f"{type(rng).__name__} of length {len(rng)}" if isinstance(rng, list) else rng)
        for i, r in enumerate(rng):
            try:
                check_rng_state(r, f"rng[{i}]")
            except ValueError as e:
                raise CheckpointError(f"{source}: {e}; it was not loaded and is left as it is") from None
        for name, t in state["model"].items():
            if name.endswith("num_batches_tracked") and not (
                isinstance(t, torch.Tensor) and not t.is_floating_point() and t.numel() == 1 and int(t) >= 0
            ):
                raise bad(f"model.{name}", "an integer count ≥ 0", t)
        for key, pstate in (state["optimizer"].get("state") or {}).items():
            s = pstate.get("step") if isinstance(pstate, dict) else None
            if s is not None:
                v = float(s) if isinstance(s, torch.Tensor) and s.numel() == 1 else s
                if isinstance(v, bool) or not isinstance(v, int | float) or not v >= 0:
                    raise bad(f"optimizer.state[{key}].step", "a count ≥ 0", s)

    def load_state_dict(self, state: dict[str, Any], source: str = "checkpoint") -> None:
        if state["world_size"] != self.info.world_size:
            raise CheckpointError(
                f"{source} was written by {state['world_size']} rank(s); this run has "
                f"{self.info.world_size} (resume with the same --nproc_per_node)"
            )
        self.check_state(state, source)
        saved = TrainConfig.from_dict(state["config"], source=source).to_dict()
        diff = sorted(
            k for k, v in self.cfg.to_dict().items() if saved[k] != v and k not in RESUMABLE_CHANGES
        )
        if diff:
            details = ", ".join(f"{k}: {saved[k]!r} → {self.cfg.to_dict()[k]!r}" for k in diff)
            raise CheckpointError(
                f"{source} was written with a different config ({details}); only "
                f"{sorted(RESUMABLE_CHANGES)} may change on resume"
            )
        try:
            D.unwrap(self.model).load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{source} does not match the model/optimizer of this config: {e}") from e
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        self.global_step = int(state["global_step"])
        change = describe_length_change(TrainConfig.from_dict(state["config"], source=source), self.cfg,
                                        self.steps_per_epoch, self.global_step)
        if change and self.info.is_main and self.epoch < self.cfg.epochs:
            log.warning("%s", change)
        self._acc = dict(state.get("epoch_accumulators", self._acc))
        self.history = list(state.get("history", []))
        self.wd_tools.load_state_dict(state.get("wd_tools", {}))
        restore_rng_state(state["rng"][self.info.rank], self.generator)

    def save(self) -> None:
        """Write ``checkpoint.pt`` atomically (rank 0) after gathering every rank's RNG state."""
        if self.checkpoint_path is None:
            return
        state = self.state_dict()
        if self.info.is_main:
            save_checkpoint(state, self.checkpoint_path)
            log.debug(
                "saved checkpoint %s (epoch %d, step %d)",
                self.checkpoint_path,
                self.epoch,
                self.step_in_epoch,
            )
        D.barrier(self.info)

    def resume(self, path: str | Path | None = None) -> None:
        """Load ``path`` (default ``out_dir/checkpoint.pt``); later metrics are dropped from the files."""
        path = Path(path) if path is not None else self.checkpoint_path
        if path is None:
            raise CheckpointError("resume needs a checkpoint path or an out_dir")
        if not path.is_file() and self.out is not None and (self.out / METRICS_FILES[0]).is_file():
            raise CheckpointError(
                f"cannot resume: {self.out} holds no checkpoint yet (the run stopped before its first one was "
                "saved); to start it again, move its metrics files away (or delete them) and run without --resume"
            )
        self.load_state_dict(load_checkpoint(path, map_location=self.device), source=f"checkpoint {path}")
        if self._writer is not None:
            self._writer.truncate_after(self.global_step)
        log.info("resumed from %s at epoch %d, step %d (global step %d)", path, self.epoch, self.step_in_epoch,
                 self.global_step)
