"""The norm comparison: the same model trained with nn.BatchNorm2d ("bn") and each Lp norm, for several seeds.

Runs are interleaved (for each seed, every norm in turn) so machine noise spreads over all norms alike.
Per run it records the epoch curves, final test accuracy and loss, and the median time of a training step
(forward + backward + optimizer step); per norm, the bytes of activations saved for backward
(:func:`~normmatters.experiments.memory.saved_activation_bytes`). Time and memory are reported as ratios to
the ``bn`` baseline measured in the same process.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .config import TrainConfig
from .data import DataSplit, load_dataset
from .memory import saved_activation_bytes
from .trainer import Trainer

__all__ = ["CompareConfig", "RunResult", "run_compare", "DEFAULT_NORMS"]

log = logging.getLogger(__name__)

DEFAULT_NORMS = ("bn", "l2", "l1", "linf", "topk", "range")


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
    norm: str
    seed: int
    epochs: list[dict[str, Any]]
    median_step_time: float
    saved_bytes: int

    @property
    def test_acc(self) -> float:
        return float(self.epochs[-1]["test_acc"])

    @property
    def final_loss(self) -> float:
        return float(self.epochs[-1]["train_loss"])


def run_compare(
    cfg: CompareConfig, data: DataSplit | None = None, on_run: Callable[[RunResult], None] | None = None
) -> list[RunResult]:
    """Train every (seed, norm) pair; returns one :class:`RunResult` per run in run order."""
    if "bn" not in cfg.norms:
        log.warning("no 'bn' baseline among the norms; time and memory ratios use the first norm")
    data = data if data is not None else load_dataset(cfg.dataset)
    saved: dict[str, int] = {}
    results = []
    for seed in cfg.seeds:
        for norm in cfg.norms:
            trainer = Trainer(cfg.train_config(norm, seed), data=data)
            if norm not in saved:
                x = trainer.augment(data.train.images[: cfg.batch_size].to(trainer.device), None, train=False)
                y = data.train.labels[: cfg.batch_size].to(trainer.device)
                saved[norm] = saved_activation_bytes(trainer.module, x, y)
            res = trainer.fit()
            r = RunResult(norm, seed, res.epochs, res.median_step_time, saved[norm])
            log.info(
                "%s seed %d: test acc %.4f, final loss %.4f, %.2f ms/step",
                norm,
                seed,
                r.test_acc,
                r.final_loss,
                1e3 * r.median_step_time,
            )
            results.append(r)
            if on_run is not None:
                on_run(r)
    return results
