"""The norm comparison: the same model trained with nn.BatchNorm2d ("bn") and each Lp norm, for several seeds.

For each seed every norm trains in turn; then that seed's trained models are timed side by side: one training
step (forward + backward + optimizer step) of each model in turn on the same batch, for many rounds
(:func:`time_side_by_side`, as ``normmatters bench`` does), so a busy machine slows all norms alike instead of
whichever ran during the noise. Per run it records the epoch curves, final test accuracy and loss, the median
step time and its ratio to the baseline; per norm, the bytes of activations saved for backward
(:func:`~normmatters.experiments.memory.saved_activation_bytes`). The baseline is ``bn`` (nn.BatchNorm2d) when
compared, else the first norm.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import progress
from ..estimators import available_norms, get_estimator
from .config import TrainConfig
from .data import DataSplit, load_dataset
from .memory import saved_activation_bytes
from .trainer import Trainer

__all__ = ["CompareConfig", "RunResult", "run_compare", "time_side_by_side", "DEFAULT_NORMS", "BASELINE"]

log = logging.getLogger(__name__)

DEFAULT_NORMS = ("bn",) + tuple(n for n in available_norms() if get_estimator(n).divides)
#: the norm every ratio is taken to, when compared (torch's nn.BatchNorm2d)
BASELINE = "bn"


@dataclass
class CompareConfig:
    """What to compare. ``quick`` (set by the CLI) means 1 seed and 2 epochs."""

    norms: tuple[str, ...] = DEFAULT_NORMS
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int = 8
    dataset: str = "digits"
    model: str = "resnet8"
    device: str = "cpu"
    batch_size: int = 64
    lr: float = 0.1
    weight_decay: float = 5e-4
    threads: int | None = 1
    norm_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def train_config(self, norm: str, seed: int) -> TrainConfig:
        return TrainConfig(
            model=self.model,
            dataset=self.dataset,
            norm=norm,
            norm_options=dict(self.norm_options.get(norm, {})),
            epochs=self.epochs,
            batch_size=self.batch_size,
            optimizer="sgd",
            lr=self.lr,
            momentum=0.9,
            nesterov=True,
            weight_decay=self.weight_decay,
            schedule="cosine",
            seed=seed,
            device=self.device,
            threads=self.threads,
            monitor=False,  # compare times the step: no observers on it
        )


@dataclass
class RunResult:
    """One (norm, seed) run. ``median_step_time`` and ``step_ratio`` come from the side-by-side timing after
    training (:func:`time_side_by_side`); ``step_ratio`` is to the baseline norm of the same seed."""

    norm: str
    seed: int
    epochs: list[dict[str, Any]]
    median_step_time: float
    saved_bytes: int
    step_ratio: float = float("nan")

    @property
    def test_acc(self) -> float:
        return float(self.epochs[-1]["test_acc"])

    @property
    def final_loss(self) -> float:
        return float(self.epochs[-1]["train_loss"])


def time_side_by_side(
    trainers: dict[str, Trainer], data: DataSplit, batch_size: int, rounds: int = 30, warmup: int = 3
) -> dict[str, tuple[float, float]]:
    """Time training steps of every model in turn on the same batches: ``{name: (median s, ratio)}``.

    Each round draws one batch and runs one optimizer step (forward, backward, step; as timed by
    :meth:`Trainer._train_step`) of every model, the order rotating from round to round, so machine noise
    (other processes, frequency changes) falls on all of them alike. ``ratio`` is the median over rounds of the
    step time over the first model's (the baseline) in the same round, as ``normmatters bench`` does.
    The first ``warmup`` rounds are not counted.
    """
    names = list(trainers)
    g = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + rounds):
        idx = torch.randint(len(data.train), (batch_size,), generator=g)
        x, y = data.train.images[idx], data.train.labels[idx]
        k = r % len(names)
        for n in names[k:] + names[:k]:
            trainers[n]._train_step(x, y)
            if r >= warmup:
                times[n].append(trainers[n].step_times[-1])
    base = times[names[0]]
    return {n: (statistics.median(ts), statistics.median(t / b for t, b in zip(ts, base, strict=True)))
            for n, ts in times.items()}


def run_compare(
    cfg: CompareConfig,
    data: DataSplit | None = None,
    on_run: Callable[[RunResult], None] | None = None,
    timing_rounds: int = 30,
) -> list[RunResult]:
    """Train every (seed, norm) pair, then time the seed's models side by side; one :class:`RunResult` per run.

    A progress bar per run is drawn when the command line turned bars on (:mod:`normmatters.progress`).
    """
    if BASELINE not in cfg.norms:
        log.warning("no 'bn' baseline among the norms; time and memory ratios use the first norm")
    data = data if data is not None else load_dataset(cfg.dataset)
    baseline = BASELINE if BASELINE in cfg.norms else cfg.norms[0]
    order = [baseline, *(n for n in cfg.norms if n != baseline)]
    saved: dict[str, int] = {}
    results = []
    for seed in cfg.seeds:
        trainers: dict[str, Trainer] = {}
        history: dict[str, list[dict[str, Any]]] = {}
        for norm in order:
            label = f"{norm} seed {seed}" if progress.enabled() else False
            trainer = Trainer(cfg.train_config(norm, seed), data=data, progress=label)
            if norm not in saved:
                x = trainer.augment(data.train.images[: cfg.batch_size].to(trainer.device), None, train=False)
                y = data.train.labels[: cfg.batch_size].to(trainer.device)
                saved[norm] = saved_activation_bytes(trainer.module, x, y)
            history[norm] = trainer.fit().epochs
            trainers[norm] = trainer
        timing = time_side_by_side(trainers, data, cfg.batch_size, rounds=timing_rounds)
        for norm in cfg.norms:
            r = RunResult(norm, seed, history[norm], timing[norm][0], saved[norm], timing[norm][1])
            log.info("%s seed %d: test acc %.4f, final loss %.4f, %.2f ms/step (%.2f× %s side by side)", norm, seed,
                     r.test_acc, r.final_loss, 1e3 * r.median_step_time, r.step_ratio, baseline)
            results.append(r)
            if on_run is not None:
                on_run(r)
    return results
