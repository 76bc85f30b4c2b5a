"""The weight-decay study: reproduce weight decay's effect with weight decay off (Hoffer et al. 2018, sec. 3).

Five training modes on the same data, model and batches, for each seed (decay only ever acts on the
scale-invariant weights — conv/linear weights that feed a normalization; every other parameter has none):

* ``wd``: weight decay λ on, learning-rate schedule (multi-step); its per-channel norms are recorded.
* ``none``: weight decay off, same rate schedule.
* ``mimic-ref``: off + :class:`~normmatters.optim.WeightDecayMimic` from ``wd``'s recorded trajectory.
* ``mimic-online``: off + the online mimic (no earlier run needed).
* ``norm-schedule``: off, constant rate, :class:`~normmatters.optim.NormSchedule` at the milestones instead.

Reported per mode: final test accuracy (mean ± std over seeds), and the angle between each scale-invariant
weight and the ``wd`` run's at the end of every epoch (mean over channels and layers). The effective learning
rate η/‖w‖² of each scale-invariant layer is recorded with :class:`~normmatters.optim.EffectiveLRMonitor`.
"""

from __future__ import annotations

import logging
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..optim import EffectiveLRMonitor, NormSchedule, NormTrajectory, WeightDecayMimic, scale_invariant_parameters
from .config import TrainConfig
from .data import DataSplit, load_dataset
from .optim import param_groups
from .trainer import Trainer

__all__ = ["WeightDecayStudy", "MODES", "run_weight_decay_study", "format_weight_decay_table",
           "write_weight_decay_report"]

log = logging.getLogger(__name__)

MODES = ("wd", "none", "mimic-ref", "mimic-online", "norm-schedule")


@dataclass
class WeightDecayStudy:
    """Settings of the study (``quick``: 1 seed, 4 epochs)."""

    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int = 12
    milestones: tuple[int, ...] = (6, 9)
    gamma: float = 0.1
    lr: float = 0.005
    momentum: float = 0.9
    weight_decay: float = 0.1
    batch_size: int = 64
    model: str = "resnet8"
    dataset: str = "digits"
    norm: str = "bn"
    threads: int | None = 1
    results: list[dict[str, Any]] = field(default_factory=list)

    def config(self, mode: str, seed: int) -> TrainConfig:
        return TrainConfig(model=self.model, dataset=self.dataset, norm=self.norm, epochs=self.epochs,
                           batch_size=self.batch_size, optimizer="sgd", lr=self.lr, momentum=self.momentum,
                           weight_decay=0.0, wd_normalized=self.weight_decay if mode == "wd" else 0.0,
                           wd_norm=0.0, wd_other=0.0,
                           schedule="constant" if mode == "norm-schedule" else "multistep", monitor=False,
                           milestones=list(self.milestones), gamma=self.gamma, seed=seed, threads=self.threads)


def _angles(a: list[Tensor], b: list[Tensor]) -> float:
    """Mean over layers of the mean over output channels of the angle (degrees) between a and b."""
    out = []
    for x, y in zip(a, b):
        cos = torch.nn.functional.cosine_similarity(x.flatten(1).double(), y.flatten(1).double(), dim=1)
        out.append(torch.rad2deg(torch.acos(cos.clamp(-1, 1))).mean().item())
    return statistics.fmean(out)


def _scale_invariant(trainer: Trainer, data: DataSplit, batch: int) -> list[tuple[str, torch.nn.Parameter]]:
    """The weights the optimizer files as 'normalized' that are also numerically scale-invariant."""
    model = trainer.module
    x = trainer.augment(data.train.images[:batch].to(trainer.device), None, train=False)
    found = scale_invariant_parameters(model, x)
    normalized = {id(p) for p in param_groups(model)["normalized"]}
    return [(n, p) for n, p in found if id(p) in normalized]


def _run(study: WeightDecayStudy, mode: str, seed: int, data: DataSplit,
         reference: NormTrajectory | None) -> dict[str, Any]:
    trainer = Trainer(study.config(mode, seed), data=data)
    named = _scale_invariant(trainer, data, study.batch_size)
    params = [p for _, p in named]
    opt = trainer.optimizer
    traj = NormTrajectory() if mode == "wd" else None
    if traj is not None:
        opt.register_step_pre_hook(lambda *_: traj.append(params))
    if mode == "mimic-ref":
        WeightDecayMimic(opt, params, reference=reference).attach()
    elif mode == "mimic-online":
        WeightDecayMimic(opt, params, weight_decay=study.weight_decay).attach()
    elif mode == "norm-schedule":
        steps = [m * trainer.steps_per_epoch for m in study.milestones]
        sched = NormSchedule(params, steps, 1.0 / study.gamma, optimizer=opt)
        opt.register_step_post_hook(lambda *_: sched.step())
    monitor = EffectiveLRMonitor(opt, named)
    snapshots: list[list[Tensor]] = []

    def on_step(t: Trainer) -> None:
        if t.step_in_epoch == t.steps_per_epoch:
            snapshots.append([p.detach().clone() for p in params])

    trainer.on_step = on_step
    res = trainer.fit()
    return {"mode": mode, "seed": seed, "test_acc": float(res.epochs[-1]["test_acc"]), "epochs": res.epochs,
            "names": [n for n, _ in named], "snapshots": snapshots, "trajectory": traj,
            "effective_lr": [statistics.fmean(v for k, v in row.items() if k.endswith("/effective_lr"))
                             for row in monitor.history]}


def run_weight_decay_study(study: WeightDecayStudy, data: DataSplit | None = None) -> list[dict[str, Any]]:
    """Train every (seed, mode); adds ``angle_deg`` (per epoch, to the same seed's ``wd`` run) and, except for
    ``wd``, ``angle_to_none_deg`` (final, to the same seed's ``none`` run) to each result."""
    data = data if data is not None else load_dataset(study.dataset)
    results = []
    for seed in study.seeds:
        ref = _run(study, "wd", seed, data, None)
        ref["angle_deg"] = [0.0] * len(ref["snapshots"])
        ref["angle_to_none_deg"] = float("nan")
        results.append(ref)
        plain = None
        for mode in MODES[1:]:
            r = _run(study, mode, seed, data, ref["trajectory"])
            r["angle_deg"] = [_angles(a, b) for a, b in zip(ref["snapshots"], r["snapshots"])]
            plain = plain or r  # the "none" run: the rate-schedule twin of the norm schedule
            r["angle_to_none_deg"] = _angles(plain["snapshots"][-1], r["snapshots"][-1])
            log.info("weight decay study seed %d %s: test acc %.4f, final angle to wd %.2f deg", seed, mode,
                     r["test_acc"], r["angle_deg"][-1])
            results.append(r)
    study.results = results
    return results


def summarize_weight_decay(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for mode in MODES:
        rs = [r for r in results if r["mode"] == mode]
        if not rs:
            continue
        accs = [r["test_acc"] for r in rs]
        final = [r["angle_deg"][-1] for r in rs]
        mid = [r["angle_deg"][len(r["angle_deg"]) // 2] for r in rs]
        rows.append({"mode": mode, "seeds": len(rs), "acc_mean": statistics.fmean(accs),
                     "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                     "angle_mid": statistics.fmean(mid), "angle_final": statistics.fmean(final),
                     "angle_none": statistics.fmean(r["angle_to_none_deg"] for r in rs)})
    return rows


def format_weight_decay_table(results: list[dict[str, Any]]) -> str:
    lines = ["| mode | seeds | test acc (mean ± std) | angle to wd run, mid-training | angle to wd run, final "
             "| angle to no-decay run, final |", "|---|---|---|---|---|---|"]
    for r in summarize_weight_decay(results):
        lines.append(f"| {r['mode']} | {r['seeds']} | {100 * r['acc_mean']:.2f} ± {100 * r['acc_std']:.2f} % | "
                     f"{r['angle_mid']:.2f}° | {r['angle_final']:.2f}° | "
                     + ("—" if math.isnan(r["angle_none"]) else f"{r['angle_none']:.2f}°") + " |")
    return "\n".join(lines)


def write_weight_decay_report(study: WeightDecayStudy, results: list[dict[str, Any]], out: Path) -> Path:
    """report.md, results.csv, effective_lr.png and angles.png in ``out``."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["mode", "seed", "test_acc", "final_angle_deg"])
        for r in results:
            w.writerow([r["mode"], r["seed"], f"{r['test_acc']:.6f}", f"{r['angle_deg'][-1]:.4f}"])
    seed0 = results[0]["seed"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        if r["seed"] == seed0:
            ax.plot(r["effective_lr"], label=r["mode"])
    ax.set(yscale="log", xlabel="step", ylabel="mean η/‖w‖² of scale-invariant layers",
           title=f"effective learning rate (seed {seed0})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "effective_lr.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    for mode in MODES[1:]:
        rs = [r for r in results if r["mode"] == mode]
        if rs:
            curve = [statistics.fmean(v) for v in zip(*(r["angle_deg"] for r in rs))]
            ax.plot(range(1, len(curve) + 1), curve, marker="o", label=mode)
    ax.set(xlabel="epoch", ylabel="degrees", title="angle between each run's weights and the weight-decay run's")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "angles.png", dpi=110)
    plt.close(fig)
    text = [
        "# Weight decay ⇄ learning rate: the study",
        "",
        f"{study.model} with {study.norm} on {study.dataset}, {study.epochs} epochs, SGD lr {study.lr} momentum "
        f"{study.momentum}, multi-step schedule at epochs {list(study.milestones)} (×{study.gamma}); weight decay "
        f"λ = {study.weight_decay} on the scale-invariant weights only in mode `wd`; seeds {list(study.seeds)}.",
        "",
        format_weight_decay_table(results),
        "",
        "Angles: mean over channels and scale-invariant layers, then over seeds, to the same seed's `wd` run at "
        "the end of the epoch (mid-training: epoch " f"{math.ceil(study.epochs / 2)}).",
        "`norm-schedule` keeps the rate of the other parameters constant, while the rate schedule lowers it for "
        "every parameter; differences there come from those parameters too.",
        "",
        "![effective learning rate](effective_lr.png)",
        "![angles](angles.png)",
        "",
    ]
    (out / "report.md").write_text("\n".join(text))
    return out / "report.md"
