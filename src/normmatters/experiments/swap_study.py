"""The swap study (``normmatters reproduce swap``): put an Lp norm into a network trained with the stock layer.

Two trained models, each trained once with the stock normalization and the same seed:

* ``transformer``: the byte-level decoder-only transformer of the layer-norm study
  (:class:`~normmatters.experiments.layer_norm_study.CharTransformer`, pre-norm, ``nn.LayerNorm``), AdamW with a
  one-cycle-like schedule (linear warm-up over 10 % of the steps, cosine decay to 0), on the same corpus (the
  Python standard library's ``.py`` files by default; the last 10 % held out).
* ``resnet``: the ResNet of ``normmatters compare`` (:func:`~normmatters.experiments.models.build_model`,
  ``resnet8``, ``nn.BatchNorm2d``) on the embedded 8×8 digits (train split standardized per channel, no
  augmentation), SGD with Nesterov momentum 0.9 and weight decay 5e-4, same schedule shape.

For each norm of ``norms`` (``l2`` is the exactness control: Gaussian-consistent, it *is* the stock layer) the
trained model is swapped at four stages:

* ``none``: :func:`~normmatters.convert_norms` / :func:`~normmatters.convert_batchnorm`, nothing else;
* ``calibrated``: then ``calibrate_norms(model, batches)`` on ``calib_batches`` training batches;
* ``finetuned``: then ``finetune_steps`` training steps with the Lp layer in place (fresh optimizer, peak lr
  ``*_finetune_lr``, warm-up 10 % + cosine); the held-out metrics are also recorded along the way
  (``finetune.csv``, at ``finetune_points``);
* ``scratch``: the same initial weights (same seed) with the Lp layer from step 0, trained for
  ``steps + finetune_steps`` steps with the base recipe.

Two reference rows per model (norm ``torch``): ``original`` (the trained model) and ``finetuned`` (the original
fine-tuned with the same recipe and steps, so a swapped model's fine-tuning gain is not mistaken for recovery).

Metrics on held-out data (fixed batches, the same for every row): ``val_loss`` (mean cross-entropy, nats),
``bpc`` (transformer: ``val_loss / ln 2``, bits per byte), ``accuracy`` (top-1: next byte / digit class),
``drift`` = ‖f(x) − f₀(x)‖ / ‖f₀(x)‖ over all held-out logits, f₀ the original trained model (also for
``scratch``), in eval mode, ``kl`` = mean KL(p₀ ‖ p) of the predicted distributions (nats; unlike the logit
drift, blind to logit shifts softmax ignores), and ``agreement`` (fraction of held-out predictions whose
argmax equals f₀'s).
``drift_train``: the same drift with both models in training mode on the same held-out batches — for batch norm
that is what training sees (batch statistics instead of the running ones); the transformer has no train-mode
difference (no dropout), so it equals ``drift``.

Why batch norm and layer norm differ: a converted ``LpBatchNorm`` keeps the original's running mean and
variance and in eval mode normalizes by them, so ``none`` leaves the eval-mode function unchanged for every
norm; only training (batch statistics) sees the new estimator. ``LpLayerNorm`` has no running statistics: every
forward uses the new estimator, so the swap changes the function at once by the ratio of the Lp estimate to the
standard deviation of each row's activations (1 only for Gaussian rows).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..calibrate import calibrate_norms
from ..convert import convert_batchnorm
from ..convert_layer_norms import convert_norms
from ..estimators import get_estimator
from .layer_norm_study import CharTransformer, read_corpus

__all__ = ["SwapStudy", "SwapResult", "MODELS", "STAGES", "NORMS", "STOCK", "run_swap_study", "relative_drift",
           "kl_to_original", "RESULT_COLUMNS"]

log = logging.getLogger(__name__)

MODELS = ("transformer", "resnet")
STAGES = ("none", "calibrated", "finetuned", "scratch")
#: the Lp norms swapped in by default; l2 is the exactness control
NORMS = ("l2", "l1", "linf", "topk", "range")
#: the ``norm`` of the rows of the original model (the stock layer): stages ``original`` and ``finetuned``
STOCK = "torch"
#: the columns of results.csv, in order
RESULT_COLUMNS = ("model", "norm", "stage", "steps_with_norm", "steps_total", "val_loss", "bpc", "accuracy",
                  "drift", "drift_train", "kl", "agreement", "seconds")


@dataclass
class SwapStudy:
    """What to swap into what, and how long to train. Defaults: the full study (docs/swap: 1147 s on 2 cores
    under a load average of ~13)."""

    models: tuple[str, ...] = MODELS
    norms: tuple[str, ...] = NORMS
    seed: int = 0
    # the transformer (see layer_norm_study) and its corpus
    corpus: Path | None = None  # None: the standard library's .py files
    max_chars: int = 2_000_000
    lm_layers: int = 2
    lm_width: int = 64
    lm_heads: int = 4
    lm_context: int = 64
    lm_batch: int = 32
    lm_lr: float = 1e-2
    lm_steps: int = 800
    lm_finetune_steps: int = 150
    lm_finetune_lr: float = 1e-3
    lm_eval_batches: int = 16
    # the ResNet of compare
    dataset: str = "digits"
    cnn_model: str = "resnet8"
    cnn_batch: int = 64
    cnn_lr: float = 0.1
    cnn_weight_decay: float = 5e-4
    cnn_steps: int = 300
    cnn_finetune_steps: int = 60
    cnn_finetune_lr: float = 0.01
    # both
    calib_batches: int = 8
    bn_impl: str | None = None  # LpBatchNorm ``impl`` (None: the default, "auto"); "eager" skips torch.compile
    threads: int | None = 1  # torch threads while the study runs (None: leave as is); 1 is fastest on a busy CPU
    finetune_points: tuple[int, ...] = field(default_factory=lambda: (0, 10, 25, 50, 100, 150))

    def check(self) -> None:
        """Raise ValueError naming the bad setting."""
        bad = [m for m in self.models if m not in MODELS]
        if bad or not self.models:
            raise ValueError(f"swap study: models {list(self.models)}: expected a non-empty subset of {list(MODELS)}")
        if not self.norms:
            raise ValueError("swap study: norms is empty; expected some of " + ", ".join(NORMS))
        for n in self.norms:
            if not get_estimator(n).divides:
                raise ValueError(f"swap study: norm {n!r} does not divide by a dispersion (it cannot stand in for "
                                 f"the standard deviation); expected one of {list(NORMS)}")
        for name in ("lm_steps", "cnn_steps", "lm_batch", "cnn_batch", "lm_eval_batches", "calib_batches",
                     "lm_context", "lm_width"):
            if getattr(self, name) < 1:
                raise ValueError(f"swap study: {name} must be ≥ 1, got {getattr(self, name)}")
        for name in ("lm_finetune_steps", "cnn_finetune_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"swap study: {name} must be ≥ 0, got {getattr(self, name)}")


@dataclass
class SwapResult:
    """The rows of results.csv and the fine-tuning curves of one study."""

    rows: list[dict[str, Any]]
    curves: list[dict[str, Any]]  # model, norm, step, val_loss, accuracy, drift, kl
    base_seconds: dict[str, float]
    calibration: list[dict[str, Any]]  # model, norm, layer, class, factor, drift_before, drift_after, calibrated


# ---------------------------------------------------------------------------------------------------- metrics


def relative_drift(out: Tensor, ref: Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ (Frobenius over every element); ``ref`` the original model's output."""
    if out.shape != ref.shape:
        raise ValueError(f"relative_drift: output shape {tuple(out.shape)} differs from the reference's "
                         f"{tuple(ref.shape)}")
    return float((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def kl_to_original(out: Tensor, ref: Tensor) -> float:
    """Mean over predictions of KL(p₀ ‖ p) in nats, p = softmax of each row of ``out`` (N, classes), p₀ of
    ``ref``'s: how much the predicted distribution moved, blind to what softmax ignores (a shift of every logit,
    the logits of classes with vanishing probability)."""
    return float(F.kl_div(F.log_softmax(out.double(), 1), F.log_softmax(ref.double(), 1), reduction="batchmean",
                          log_target=True))


@torch.no_grad()
def _outputs(model: nn.Module, inputs: list[Tensor], train_mode: bool = False) -> Tensor:
    """The logits on every held-out batch, concatenated; in train mode on a copy (running stats untouched)."""
    m = copy.deepcopy(model).train() if train_mode else model
    was = model.training
    if not train_mode:
        model.eval()
    try:
        return torch.cat([m(x).flatten(0, -2) for x in inputs])
    finally:
        model.train(was)


@dataclass
class _Task:
    """One model: how to build it, train it and evaluate it."""

    name: str
    build: Callable[[], nn.Module]  # the stock-norm model with the seed's initial weights
    convert: Callable[[nn.Module, str], nn.Module]
    next_batch: Callable[[torch.Generator], tuple[Tensor, Tensor]]
    eval_inputs: list[Tensor]
    eval_targets: Tensor  # flattened, aligned with _outputs
    calib_inputs: list[Tensor]
    optimizer: Callable[[nn.Module, float], torch.optim.Optimizer]
    lr: float
    steps: int
    finetune_lr: float
    finetune_steps: int
    train_mode_differs: bool
    bits: bool  # report bits per character

    def metrics(self, model: nn.Module, ref: Tensor | None, ref_train: Tensor | None) -> dict[str, float]:
        out = _outputs(model, self.eval_inputs)
        loss = float(F.cross_entropy(out, self.eval_targets))
        row = {"val_loss": loss, "bpc": loss / math.log(2) if self.bits else float("nan"),
               "accuracy": float((out.argmax(1) == self.eval_targets).double().mean())}
        if ref is not None:
            row["drift"] = relative_drift(out, ref)
            row["kl"] = kl_to_original(out, ref)
            row["agreement"] = float((out.argmax(1) == ref.argmax(1)).double().mean())
            if not self.train_mode_differs:
                row["drift_train"] = row["drift"]
            elif ref_train is not None:
                row["drift_train"] = relative_drift(_outputs(model, self.eval_inputs, True), ref_train)
        return row


def _schedule(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over 10 % of the steps, then cosine decay to 0."""
    warm = max(1, steps // 10)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, steps - warm))))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _train(task: _Task, model: nn.Module, steps: int, lr: float, gen: torch.Generator,
           on_step: Callable[[int], None] | None = None) -> None:
    """``steps`` optimizer steps of the task's recipe; ``on_step(k)`` after step k (and k = 0 before)."""
    if on_step is not None:
        on_step(0)
    if steps == 0:
        return
    opt = task.optimizer(model, lr)
    sched = _schedule(opt, steps)
    model.train()
    for step in range(1, steps + 1):
        x, y = task.next_batch(gen)
        loss = F.cross_entropy(model(x).flatten(0, -2), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if on_step is not None:
            on_step(step)
    model.eval()


# ------------------------------------------------------------------------------------------------------ tasks


def _transformer_task(study: SwapStudy) -> _Task:
    data = torch.frombuffer(bytearray(read_corpus(study.corpus, study.max_chars)), dtype=torch.uint8)
    split = int(len(data) * 0.9)
    train, val = data[:split], data[split:]
    if len(val) <= study.lm_context + 1:
        raise ValueError(f"swap study: the held-out corpus ({len(val)} bytes) is shorter than the context "
                         f"({study.lm_context}); use a larger corpus or a smaller context")
    ctx, batch = study.lm_context, study.lm_batch

    def sample(source: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        start = torch.randint(0, len(source) - ctx - 1, (batch,), generator=gen)
        chunk = source[start[:, None] + torch.arange(ctx + 1)].long()
        return chunk[:, :-1], chunk[:, 1:]

    g_eval, g_cal = torch.Generator().manual_seed(12345), torch.Generator().manual_seed(777)
    evals = [sample(val, g_eval) for _ in range(study.lm_eval_batches)]

    def build() -> nn.Module:
        torch.manual_seed(study.seed)
        return CharTransformer("nn.LayerNorm", study.lm_layers, study.lm_width, study.lm_heads, ctx)

    return _Task(
        "transformer", build, lambda m, norm: convert_norms(m, norm=norm, kinds=("layer",)),
        lambda gen: sample(train, gen), [x for x, _ in evals], torch.cat([y.flatten() for _, y in evals]),
        [sample(train, g_cal)[0] for _ in range(study.calib_batches)],
        lambda m, lr: torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.01),
        study.lm_lr, study.lm_steps, study.lm_finetune_lr, study.lm_finetune_steps, False, True)


def _resnet_task(study: SwapStudy) -> _Task:
    from .data import load_dataset
    from .models import build_model

    data = load_dataset(study.dataset)
    mean, std = data.channel_stats()

    def norm(x: Tensor) -> Tensor:
        return (x - mean[:, None, None]) / std[:, None, None]

    train_x, train_y = norm(data.train.images), data.train.labels
    test_x, test_y = norm(data.test.images), data.test.labels
    batch = study.cnn_batch

    def sample(gen: torch.Generator) -> tuple[Tensor, Tensor]:
        idx = torch.randint(len(train_y), (batch,), generator=gen)
        return train_x[idx], train_y[idx]

    g_cal = torch.Generator().manual_seed(777)

    def build() -> nn.Module:
        torch.manual_seed(study.seed)
        return build_model(study.cnn_model, "bn", in_channels=data.in_channels, image_size=data.image_size,
                           num_classes=data.num_classes)

    def sgd(m: nn.Module, lr: float) -> torch.optim.Optimizer:
        return torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9, nesterov=True,
                               weight_decay=study.cnn_weight_decay)

    chunks = list(torch.split(torch.arange(len(test_y)), 256))
    return _Task(
        "resnet", build, lambda m, n: convert_batchnorm(m, norm=n, impl=study.bn_impl), sample,
        [test_x[i] for i in chunks], test_y, [sample(g_cal)[0] for _ in range(study.calib_batches)], sgd,
        study.cnn_lr, study.cnn_steps, study.cnn_finetune_lr, study.cnn_finetune_steps, True, False)


# ------------------------------------------------------------------------------------------------------ study


def run_swap_study(study: SwapStudy) -> SwapResult:
    """Train each model once with its stock norm, then swap every norm in at every stage (module docstring)."""
    study.check()
    threads = torch.get_num_threads()
    if study.threads is not None:
        torch.set_num_threads(study.threads)
    try:
        return _run(study)
    finally:
        torch.set_num_threads(threads)


def _run(study: SwapStudy) -> SwapResult:
    calibration: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    curves: list[dict[str, Any]] = []
    base_seconds: dict[str, float] = {}
    for name in study.models:
        task = _transformer_task(study) if name == "transformer" else _resnet_task(study)
        t0 = time.perf_counter()
        original = task.build()
        _train(task, original, task.steps, task.lr, torch.Generator().manual_seed(study.seed))
        base_seconds[name] = time.perf_counter() - t0
        ref = _outputs(original, task.eval_inputs)
        ref_train = _outputs(original, task.eval_inputs, True) if task.train_mode_differs else ref
        total = task.steps + task.finetune_steps

        def row(norm: str, stage: str, model: nn.Module, with_norm: int, steps_total: int, seconds: float,
                task: _Task = task, ref: Tensor = ref, ref_train: Tensor = ref_train) -> None:
            r = {"model": task.name, "norm": norm, "stage": stage, "steps_with_norm": with_norm,
                 "steps_total": steps_total, **task.metrics(model, ref, ref_train), "seconds": seconds}
            rows.append(r)
            log.info("swap study: %s %s %s: val loss %.4f, drift %.4g, accuracy %.4f", task.name, norm, stage,
                     r["val_loss"], r["drift"], r["accuracy"])

        row(STOCK, "original", original, 0, task.steps, base_seconds[name])
        for norm in (STOCK, *study.norms):
            t0 = time.perf_counter()
            model = copy.deepcopy(original)
            if norm != STOCK:
                model = task.convert(model, norm)
                row(norm, "none", model, 0, task.steps, time.perf_counter() - t0)
                t0 = time.perf_counter()
                for c in calibrate_norms(model, task.calib_inputs):
                    calibration.append({"model": task.name, "norm": norm, "layer": c.name, "class": c.layer,
                                        "factor": c.factor, "drift_before": c.drift_before,
                                        "drift_after": c.drift_after, "calibrated": c.calibrated})
                row(norm, "calibrated", model, 0, task.steps, time.perf_counter() - t0)
                t0 = time.perf_counter()
            points = {p for p in study.finetune_points if p <= task.finetune_steps} | {task.finetune_steps}

            def record(step: int, model: nn.Module = model, norm: str = norm, points: set = points,
                       task: _Task = task, ref: Tensor = ref) -> None:
                if step in points:
                    m = task.metrics(model, ref, None)
                    curves.append({"model": task.name, "norm": norm, "step": step, "val_loss": m["val_loss"],
                                   "accuracy": m["accuracy"], "drift": m["drift"], "kl": m["kl"]})

            _train(task, model, task.finetune_steps, task.finetune_lr,
                   torch.Generator().manual_seed(study.seed + 1), record)
            row(norm, "finetuned", model, task.finetune_steps if norm != STOCK else 0, total,
                time.perf_counter() - t0)
            if norm == STOCK:
                continue
            t0 = time.perf_counter()
            scratch = task.convert(task.build(), norm)
            _train(task, scratch, total, task.lr, torch.Generator().manual_seed(study.seed))
            row(norm, "scratch", scratch, total, total, time.perf_counter() - t0)
    return SwapResult(rows, curves, base_seconds, calibration)
