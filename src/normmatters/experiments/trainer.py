"""``Trainer``: one supervised classification run that can stop at any step and resume bit-identically.

What makes resume exact: the data order of epoch e is a pure function of (seed, epoch, rank, world size)
(``DistributedSampler`` with ``set_epoch``); augmentation draws from a per-rank ``torch.Generator``
whose state is checkpointed; the checkpoint also holds model, optimizer, scheduler, the partial-epoch
accumulators and the global torch / CUDA / numpy / python RNG states of every rank.
Resuming replays the remaining batches of the
interrupted epoch with exactly the same tensors, so weights after "1 epoch + resume + 1 epoch" equal those
after 2 epochs straight (on the same device, threads and library versions).

Files (``out_dir``, rank 0 only): ``config.yaml``, ``metrics.jsonl``, ``steps.csv``, ``epochs.csv``,
``checkpoint.pt``. The library logs through ``logging``; progress bars only when asked (the CLI decides).
Checkpoint and resume plumbing (state_dict, load_state_dict, save, resume): :mod:`.trainer_state`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DistributedSampler

from ..functional import NonFiniteBatchError
from ..progress import progress_bar
from ..weight_norm_form import to_weight_norm_form
from . import distributed as D
from .augment import Augment
from .batches import iterate_batches
from .checkpoint import CheckpointError
from .config import BOUNDED_WEIGHT_NORM, NO_WEIGHT_NORM, ConfigError, TrainConfig, save_config
from .data import ArrayDataset, DataSplit, load_dataset
from .metrics import MetricsWriter
from .models import build_model
from .optim import build_optimizer, build_scheduler
from .run_folder import check_output_folder, tidy_run_folder
from .stop_signals import stop_on_signals
from .trainer_state import CHECKPOINT_NAME, RESUMABLE_CHANGES, TrainerState
from .wd_tools import WeightDecayTools

__all__ = ["Trainer", "TrainResult", "DivergedError", "CHECKPOINT_NAME", "RESUMABLE_CHANGES"]

log = logging.getLogger(__name__)

class DivergedError(RuntimeError):
    """The loss (or a normalization's batch statistics) became NaN/Inf: training stopped, nothing saved."""


@dataclass
class TrainResult:
    """``status``: "finished"; "complete" (resumed a run that had already reached ``epochs``: nothing trained);
    or the reason it stopped early ("SIGINT", "SIGTERM", "stopped")."""

    status: str
    epochs: list[dict[str, Any]]
    step_times: list[float] = field(default_factory=list)
    out_dir: Path | None = None

    @property
    def final(self) -> dict[str, Any]:
        return self.epochs[-1] if self.epochs else {}

    @property
    def median_step_time(self) -> float:
        return statistics.median(self.step_times) if self.step_times else float("nan")


class Trainer(TrainerState):
    """Build data, model, optimizer and schedule from a :class:`TrainConfig` and train.

    Args:
        config: the run.
        out_dir: where rank 0 writes config, metrics and checkpoints; ``None`` writes nothing.
        data: an already loaded :class:`DataSplit` (else ``config.dataset`` is loaded).
        dist_info: the process group (default: the current one, or single-process).
        progress: show a tqdm bar (rank 0 only): True/False, a label (a bar that clears itself when done, for
            runs within a study), or None: as the command line set :func:`normmatters.progress.enable`.
        on_step: ``f(trainer)`` called after every optimizer step (tests use it to stop mid-epoch).
    """

    def __init__(
        self,
        config: TrainConfig,
        out_dir: str | Path | None = None,
        *,
        data: DataSplit | None = None,
        dist_info: D.DistInfo | None = None,
        progress: bool | str | None = None,
        on_step: Callable[[Trainer], None] | None = None,
    ) -> None:
        self.cfg = config
        self.out = Path(out_dir) if out_dir is not None else None
        self.info = dist_info or D.current()
        self.progress = progress if self.info.is_main else False
        if self.out is not None and self.info.is_main:
            check_output_folder(self.out)
        self.on_step = on_step
        if config.threads:
            torch.set_num_threads(config.threads)
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"config: device={config.device!r} but CUDA is not available")
        self.data = data if data is not None else load_dataset(config.dataset)
        if config.batch_size % self.info.world_size:
            raise ValueError(
                f"config: batch_size={config.batch_size} (global) must be divisible by the world "
                f"size {self.info.world_size}"
            )
        self.local_batch = config.batch_size // self.info.world_size
        self.steps_per_epoch = len(self.data.train) // config.batch_size
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"config: batch_size={config.batch_size} is larger than the training set "
                f"({len(self.data.train)} samples of {self.data.name})"
            )

        torch.manual_seed(config.seed)
        random.seed(config.seed)
        np.random.seed(config.seed)
        try:
            model = build_model(config.model, config.norm, in_channels=self.data.in_channels,
                                image_size=self.data.image_size, num_classes=self.data.num_classes,
                                width=config.width, **config.norm_options)
        except TypeError as e:  # an option the norm layer does not take
            raise ConfigError(f"config: norm_options {config.norm_options} are not accepted by norm="
                              f"{config.norm!r}: {e}") from None
        if config.weight_norm != NO_WEIGHT_NORM:  # the paper's form: (bounded) weight norm + mean-only batch norm
            mean, std = self.data.channel_stats()
            n0 = min(256, len(self.data.train))
            x0 = (self.data.train.images[:n0] - mean.reshape(1, -1, 1, 1)) / std.reshape(1, -1, 1, 1)
            to_weight_norm_form(model, bounded=config.weight_norm == BOUNDED_WEIGHT_NORM, p=config.weight_norm_p,
                                example_input=x0)
        model = D.prepare_norm_layers(model, config.sync_norm, self.info, self.device)
        self.param_dtype = torch.bfloat16 if config.dtype == "bf16" else torch.float32
        model = model.to(self.device, self.param_dtype)
        self.model = D.wrap_model(model, self.info, self.device)
        self.optimizer = build_optimizer(D.unwrap(self.model), config)
        self.scheduler = build_scheduler(self.optimizer, config, self.steps_per_epoch)
        mean, std = self.data.channel_stats()
        self.augment = Augment(mean.to(self.device), std.to(self.device), config.crop_padding, config.hflip)
        self.wd_tools = WeightDecayTools(self)
        # per-rank augmentation stream: ranks see different crops/flips, and it is resumable
        self.generator = torch.Generator().manual_seed(config.seed * 1_000_003 + self.info.rank)
        self.sampler = DistributedSampler(
            self.data.train,
            num_replicas=self.info.world_size,
            rank=self.info.rank,
            shuffle=True,
            seed=config.seed,
            drop_last=False,
        )

        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.history: list[dict[str, Any]] = []
        self.step_times: list[float] = []
        self._acc = {"loss": 0.0, "correct": 0, "count": 0}
        self._stop: str | None = None
        self._writer = (MetricsWriter(self.out, tensorboard=config.tensorboard)
                        if self.out is not None and self.info.is_main else None)

    # ------------------------------------------------------------------------------------------ state
    def request_stop(self, reason: str = "stopped") -> None:
        """Finish the current step, save a checkpoint and return from :meth:`fit` with status ``reason``."""
        self._stop = reason

    # ------------------------------------------------------------------------------------------- loop
    def _epoch_batches(self, epoch: int) -> list[Tensor]:
        self.sampler.set_epoch(epoch)
        order = torch.tensor(list(iter(self.sampler)), dtype=torch.long)
        b = self.local_batch
        if self.cfg.batch_order == "class_sorted":
            # correlated batches: this epoch's samples sorted by class, then the batches in random order
            order = order[self.data.train.labels[order].argsort(stable=True)]
            batches = [order[i * b : (i + 1) * b] for i in range(self.steps_per_epoch)]
            g = torch.Generator().manual_seed(self.cfg.seed * 7919 + epoch)
            return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        return [order[i * b : (i + 1) * b] for i in range(self.steps_per_epoch)]

    def _batches(self, epoch: int, start: int) -> Iterator[tuple[Tensor, Tensor]]:
        return iterate_batches(self.data.train, self._epoch_batches(epoch)[start:], self.cfg.workers)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.cfg.dtype == "autocast":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _train_step(self, x: Tensor, y: Tensor) -> None:
        x = self.augment(x.to(self.device), self.generator, train=True).to(self.param_dtype)
        y = y.to(self.device)
        self._sync()  # the augmentation's queued kernels finish outside the timed step
        t0 = time.perf_counter()
        try:
            with self._autocast():
                out = self.model(x)
        except NonFiniteBatchError as e:
            self._diverged(str(e))
        loss = F.cross_entropy(out.float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self._sync()
        self.step_times.append(time.perf_counter() - t0)
        lv = float(loss.item())
        if not math.isfinite(lv):
            self._diverged(f"the loss is {lv}")
        self._acc["loss"] += lv * len(y)
        self._acc["correct"] += int((out.argmax(1) == y).sum())
        self._acc["count"] += len(y)
        self.step_in_epoch += 1
        self.global_step += 1
        if self._writer is not None and self.global_step % self.cfg.log_every == 0:
            self._writer.write({"kind": "step", "global_step": self.global_step, "epoch": self.epoch, "loss": lv,
                                "lr": self.optimizer.param_groups[0]["lr"], **self.wd_tools.metrics(self.global_step)})

    def _sync(self) -> None:
        """Wait for the device (CUDA runs kernels asynchronously: a step timed without it is its launches)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _diverged(self, what: str) -> None:
        last = f"{self.checkpoint_path} holds epoch {self.epoch}" if self.checkpoint_path is not None and \
            self.checkpoint_path.is_file() else "no checkpoint was saved"
        raise DivergedError(
            f"training diverged at epoch {self.epoch + 1}, step {self.step_in_epoch + 1} (global step "
            f"{self.global_step + 1}): {what}; stopped without saving ({last}). Try a lower learning rate "
            f"(lr={self.cfg.lr:g}) or a warm-up (warmup_epochs)"
        )

    @torch.no_grad()
    def evaluate(self, data: ArrayDataset | None = None, batch_size: int = 512) -> dict[str, float]:
        """Test loss and accuracy with running statistics (rank 0's, broadcast first)."""
        data = data if data is not None else self.data.test
        D.broadcast_buffers(self.model, self.info)
        model = D.unwrap(self.model)
        model.eval()
        loss, correct = 0.0, 0
        for i in range(0, len(data), batch_size):
            x = self.augment(data.images[i : i + batch_size].to(self.device), None, train=False).to(
                self.param_dtype
            )
            y = data.labels[i : i + batch_size].to(self.device)
            with self._autocast():
                out = model(x).float()
            loss += float(F.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
        model.train()
        return {"test_loss": loss / len(data), "test_acc": correct / len(data)}

    def _end_epoch(self) -> dict[str, Any]:
        acc = torch.tensor([self._acc["loss"], self._acc["correct"], self._acc["count"]], dtype=torch.float64)
        acc = D.all_reduce_mean(acc, self.info)
        record = {
            "kind": "epoch",
            "global_step": self.global_step,
            "epoch": self.epoch + 1,
            "train_loss": float(acc[0] / acc[2]),
            "train_acc": float(acc[1] / acc[2]),
            **self.evaluate(),
            "lr": self.optimizer.param_groups[0]["lr"],
        }
        self.history.append(record)
        if self._writer is not None:
            self._writer.write(record)
        (log.info if self.info.is_main else log.debug)(
            "epoch %d/%d (step %d): train loss %.4f acc %.2f %%, test loss %.4f acc %.2f %%, lr %.4g",
            record["epoch"],
            self.cfg.epochs,
            record["global_step"],
            record["train_loss"],
            100 * record["train_acc"],
            record["test_loss"],
            100 * record["test_acc"],
            record["lr"],
        )
        self.epoch += 1
        self.step_in_epoch = 0
        self._acc = {"loss": 0.0, "correct": 0, "count": 0}
        return record

    @contextlib.contextmanager
    def _progress_bar(self) -> Iterator[Any]:
        """A tqdm bar over all steps (or None); log lines go through tqdm meanwhile so they do not garble it."""
        label = self.progress if isinstance(self.progress, str) else None
        with progress_bar(self.cfg.epochs * self.steps_per_epoch, desc=label, unit="step", leave=self.progress is True,
                          force=None if self.progress is None else bool(self.progress)) as bar:
            bar.update(self.global_step)
            yield bar

    def fit(
        self, resume: bool = False, handle_signals: bool = False, stop_after_epoch: int | None = None
    ) -> TrainResult:
        """Train to ``config.epochs`` (or until ``stop_after_epoch`` / a stop request), checkpointing.

        ``resume=True`` continues from ``out_dir/checkpoint.pt``; without it an existing checkpoint there
        is an error (it is never overwritten by a fresh run).
        """
        if resume:
            self.resume()
        elif self.checkpoint_path is not None and self.checkpoint_path.exists():
            raise CheckpointError(
                f"{self.checkpoint_path} already exists; resume it (--resume) or choose another output folder"
            )
        if resume and self.epoch >= self.cfg.epochs:  # nothing to do: leave the folder as it is
            log.info("%s is complete: %d of %d epochs trained; pass a larger epochs to extend it",
                     self.out, self.epoch, self.cfg.epochs)
            return TrainResult("complete", list(self.history), [], self.out)
        if self.out is not None and self.info.is_main:
            tidy_run_folder(self.out, fresh=not resume, writer=self._writer)
            save_config(self.cfg, self.out / "config.yaml")
        status = "finished"
        with stop_on_signals(self.request_stop, lambda: self._stop is not None, handle_signals), \
                self._progress_bar() as bar:
            while self.epoch < self.cfg.epochs:
                if stop_after_epoch is not None and self.epoch >= stop_after_epoch:
                    status = "stopped"
                    break
                for x, y in self._batches(self.epoch, self.step_in_epoch):
                    self._train_step(x, y)
                    bar.update(1)
                    bar.set_postfix(epoch=self.epoch + 1, loss=f"{self._acc['loss'] / self._acc['count']:.3f}")
                    if self.on_step is not None:
                        self.on_step(self)
                    if D.any_rank(self._stop is not None, self.info, self.device):
                        break
                stopping = D.any_rank(self._stop is not None, self.info, self.device)
                if not stopping:
                    self._end_epoch()
                if stopping or self.epoch % self.cfg.checkpoint_every == 0 or self.epoch == self.cfg.epochs:
                    self.save()
                if stopping:
                    status = self._stop or "stopped"
                    break
        if self.info.is_main:
            self.wd_tools.finish(self.out, self.cfg.record_norms)
        if self._writer is not None:
            self._writer.flush()
        if (
            status == "stopped"
            and self.checkpoint_path is not None
            and self.epoch % self.cfg.checkpoint_every
        ):
            self.save()
        return TrainResult(status, list(self.history), list(self.step_times), self.out)

    @property
    def module(self) -> nn.Module:
        """The trained model (unwrapped from DDP)."""
        return D.unwrap(self.model)
