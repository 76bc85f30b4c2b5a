"""Watch the effective step size and the angular update of scale-invariant weights during training.

Cheap and bounded for long runs: between logging steps the monitor's optimizer hooks only count (no clone, no
device work); on a logging step it snapshots the weights before the step, computes every value on the device
and reads them back to the host in one transfer. ``history`` keeps the last ``max_history`` rows; a ``sink``
(a callable) or a TensorBoard ``SummaryWriter`` (``writer``) receives every row as it is made.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..atomic_write import atomic_savefig
from .effective_step import norm_power
from .equilibrium import equilibrium_angular_update
from .scale_invariance import gradient_scale_invariant
from .trajectory import channel_norms

__all__ = ["EffectiveLRMonitor", "METRICS", "QUANTILES"]

log = logging.getLogger(__name__)

#: the per-layer metrics, metric first: ``<metric>/<parameter name>``
METRICS = ("effective_lr", "angular_update", "norm")
#: the names of the quantiles over layers used past ``max_layers`` layers: ``<metric>/<quantile>``
QUANTILES = (("min", 0.0), ("q25", 0.25), ("median", 0.5), ("q75", 0.75), ("max", 1.0))


def _quantile(values: list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of a non-empty list."""
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


class EffectiveLRMonitor:
    """Through ``optimizer``'s step hooks, every ``every_n_steps``-th step record per named parameter (a layer):

    * ``effective_lr/<name>``: the mean over output channels c of η·f_c/‖w_c‖^p, the norm before the step,
      p = 2 for SGD-like optimizers (a scale-invariant weight's gradient scales as 1/‖w‖, so its angular step is
      η‖∇_û L‖/‖w‖²) and 1 for adaptive ones (Adam, AdamW, …), whose update size does not follow the
      gradient's (Hoffer et al. 2018, sec. 3); η the current ``lr`` of the parameter's group (schedulers
      included), f_c the factor ``factors()`` reports (e.g. ``lambda: mimic.last_factors``; default 1);
    * ``angular_update/<name>``: the mean over channels of the angle (degrees) between w_c before and after the
      step;
    * ``norm/<name>``: ‖w‖₂ after the step;
    * ``angular_update/equilibrium``: the spherical-motion equilibrium √(2ηλ/(1+μ)) in degrees
      (:func:`~normmatters.optim.equilibrium_angular_update`) where a watched SGD group has weight decay λ > 0
      (or ``weight_decay`` is given, e.g. the λ a weight-decay mimic reproduces); ``…/equilibrium_pg<i>`` per
      group when the watched groups differ.

    Past ``max_layers`` layers, the per-layer entries give way to quantiles over layers (``<metric>/min``,
    ``q25``, ``median``, ``q75``, ``max``), so a dashboard keeps a handful of curves. ``per_channel=True`` adds
    the per-channel lists (``channel_effective_lr/<name>``, ``channel_angular_update/<name>``,
    ``channel_norm/<name>``) to the rows (not to ``writer``).

    ``detect=True`` treats ``named_params`` as candidates and keeps, after the first logging step, those whose
    gradient passes :func:`~normmatters.optim.gradient_scale_invariant` (useful where no example input is at
    hand to run :func:`~normmatters.optim.scale_invariant_parameters`).

    Cost: a step that logs nothing runs two Python hooks that increment a counter. A logging step clones the
    watched weights before the step and makes one device-to-host transfer after it. ``history`` is a deque of
    the last ``max_history`` rows (``{"step": k, ...}``, k counting optimizer steps from 1); :meth:`latest` gives
    the last row's scalars; ``sink(row)`` and ``writer.add_scalar(tag, value, k)`` receive each row;
    :meth:`plot` writes a PNG; :meth:`remove` detaches the hooks.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, named_params: Iterable[tuple[str, Tensor]],
                 per_channel: bool = False, *, every_n_steps: int = 1, max_history: int | None = 10_000,
                 max_layers: int = 32, factors: Callable[[], list[Tensor]] | None = None,
                 weight_decay: float | None = None, sink: Callable[[dict[str, Any]], None] | None = None,
                 writer: Any = None, detect: bool = False, start_step: int = 0) -> None:
        self.optimizer = optimizer
        self.named_params = list(named_params)
        if not self.named_params:
            raise ValueError("EffectiveLRMonitor: got no parameters")
        if every_n_steps < 1:
            raise ValueError(f"EffectiveLRMonitor: every_n_steps must be >= 1, got {every_n_steps}")
        if max_history is not None and max_history < 1:
            raise ValueError(f"EffectiveLRMonitor: max_history must be >= 1 or None, got {max_history}")
        if max_layers < 1:
            raise ValueError(f"EffectiveLRMonitor: max_layers must be >= 1, got {max_layers}")
        if weight_decay is not None and not (weight_decay >= 0 and math.isfinite(weight_decay)):
            raise ValueError(f"EffectiveLRMonitor: weight_decay must be a finite number >= 0, got {weight_decay}")
        if writer is not None and not callable(getattr(writer, "add_scalar", None)):
            raise TypeError(f"EffectiveLRMonitor: writer must have add_scalar(tag, value, step) (a TensorBoard "
                            f"SummaryWriter), got {type(writer).__name__}")
        self.per_channel = per_channel
        self.every_n_steps = every_n_steps
        self.max_layers = max_layers
        self.factors_fn = factors
        self.weight_decay = weight_decay
        self.sink = sink
        self.writer = writer
        self.detect = detect
        self.power = norm_power(optimizer)
        self.adaptive = self.power == 1
        self.history: deque[dict[str, Any]] = deque(maxlen=max_history)
        #: optimizer steps seen (the next step is ``count + 1``)
        self.count = start_step
        # group indices, not the dicts: optimizer.load_state_dict replaces the dicts
        self._group_index: list[int] = []
        for name, p in self.named_params:
            index = next((i for i, g in enumerate(optimizer.param_groups) if any(p is q for q in g["params"])),
                         None)
            if index is None:
                raise ValueError(f"EffectiveLRMonitor: parameter {name!r} is not in the optimizer")
            self._group_index.append(index)
        self._before: list[Tensor] | None = None
        self._pre = optimizer.register_step_pre_hook(self._snapshot)
        self._post = optimizer.register_step_post_hook(self._record)

    # ------------------------------------------------------------------------------------------ hooks
    def logs_next_step(self) -> bool:
        """Whether the coming optimizer step is a logging step."""
        return (self.count + 1) % self.every_n_steps == 0

    @torch.no_grad()
    def _snapshot(self, *_: Any) -> None:
        if not self.logs_next_step():
            self._before = None
            return
        self._before = [p.detach().clone() for _, p in self.named_params]

    def _select(self, before: list[Tensor]) -> list[Tensor]:
        """Keep the candidates whose gradient (still there after the step; taken at ``before``) says they are
        scale-invariant (one host read). After the step, not before it: a training loop may compute the
        gradient inside ``optimizer.step(closure)``, after the pre-hooks."""
        keep = gradient_scale_invariant([p for _, p in self.named_params], weights=before)
        self.named_params = [np_ for np_, k in zip(self.named_params, keep) if k]
        self._group_index = [g for g, k in zip(self._group_index, keep) if k]
        self.detect = False
        if not self.named_params:
            log.warning("EffectiveLRMonitor: no candidate weight is scale-invariant; nothing to monitor")
            self.remove()
        return [b for b, k in zip(before, keep) if k]

    @torch.no_grad()
    def _record(self, *_: Any) -> None:
        self.count += 1
        before, self._before = self._before, None
        if before is None:
            return
        if self.detect:
            before = self._select(before)
            if not before:
                return
        row = self.measure(before)
        self.history.append(row)
        if self.sink is not None:
            self.sink(row)
        if self.writer is not None:
            for k, v in row.items():
                if k != "step" and not isinstance(v, list):
                    self.writer.add_scalar(k, v, row["step"])

    # ---------------------------------------------------------------------------------------- measure
    def _lr(self, i: int) -> float | Tensor:
        lr = self.optimizer.param_groups[self._group_index[i]]["lr"]
        return lr.detach() if isinstance(lr, Tensor) else float(lr)

    @torch.no_grad()
    def measure(self, before: list[Tensor]) -> dict[str, Any]:
        """The row of the step that moved the watched weights from ``before`` to their current values.

        Every value is computed on the weights' device and read back in one transfer."""
        if len(before) != len(self.named_params):
            raise ValueError(f"EffectiveLRMonitor.measure: {len(before)} weights before the step for "
                             f"{len(self.named_params)} watched parameters")
        facs = self.factors_fn() if self.factors_fn is not None else None
        if facs is not None and len(facs) != len(self.named_params):
            raise ValueError(f"EffectiveLRMonitor: factors() gave {len(facs)} tensors for "
                             f"{len(self.named_params)} watched parameters")
        dev = self.named_params[0][1].device
        pieces: list[Tensor] = []
        sizes: list[int] = []
        for i, ((_, p), b) in enumerate(zip(self.named_params, before)):
            w = p.detach()
            nb = channel_norms(b).to(dev, torch.float64)  # (C,) before the step
            elr = self._lr(i) / nb.pow(self.power)
            if isinstance(elr, Tensor):
                elr = elr.to(dev, torch.float64)
            if facs is not None:
                elr = elr * facs[i].to(dev, torch.float64)
            if w.dim() > 1:
                cos = torch.nn.functional.cosine_similarity(b.flatten(1).double(), w.flatten(1).double(), dim=1)
            else:  # one number per channel: it turns by 180° if it changes sign
                cos = torch.sign(b.double()) * torch.sign(w.double())
            angle = torch.rad2deg(torch.acos(cos.clamp(-1, 1))).to(dev)
            summary = torch.stack([elr.mean(), angle.mean(), torch.linalg.vector_norm(w.double()).to(dev)])
            pieces.append(summary)
            sizes.append(3)
            if self.per_channel:
                pieces += [elr, angle, channel_norms(w).to(dev, torch.float64)]
                sizes += [elr.numel()] * 3
        flat = torch.cat(pieces).tolist()  # the one device-to-host transfer
        values, at = [], 0
        for n in sizes:
            values.append(flat[at:at + n])
            at += n
        return self._row(values)

    def _row(self, values: list[list[float]]) -> dict[str, Any]:
        row: dict[str, Any] = {"step": self.count}
        names = [n for n, _ in self.named_params]
        stride = 4 if self.per_channel else 1
        per_layer = {m: [values[i * stride][j] for i in range(len(names))] for j, m in enumerate(METRICS)}
        for m in METRICS:
            if len(names) <= self.max_layers:
                row.update({f"{m}/{n}": v for n, v in zip(names, per_layer[m])})
            else:
                row.update({f"{m}/{q}": _quantile(per_layer[m], x) for q, x in QUANTILES})
        row.update(self._equilibria())
        if self.per_channel:
            for i, n in enumerate(names):
                elr, angle, norm = values[i * stride + 1: i * stride + 4]
                row[f"channel_effective_lr/{n}"] = elr
                row[f"channel_angular_update/{n}"] = angle
                row[f"channel_norm/{n}"] = norm
        return row

    def _equilibria(self) -> dict[str, float]:
        """√(2ηλ/(1+μ)) (degrees) per watched SGD group with decay; one entry when all groups agree."""
        if self.adaptive:
            return {}  # derived for SGD only (optim.equilibrium)
        found: dict[int, float] = {}
        for gi in dict.fromkeys(self._group_index):
            g = self.optimizer.param_groups[gi]
            lam = self.weight_decay if self.weight_decay is not None else float(g.get("weight_decay", 0.0))
            lr = g["lr"]
            lr = float(lr) if not isinstance(lr, Tensor) else None  # a tensor rate would need a host read
            if lam > 0 and lr is not None and lr > 0:
                found[gi] = math.degrees(equilibrium_angular_update(lr, lam, float(g.get("momentum", 0.0))))
        if len(set(found.values())) == 1:
            return {"angular_update/equilibrium": next(iter(found.values()))}
        return {f"angular_update/equilibrium_pg{gi}": v for gi, v in found.items()}

    # -------------------------------------------------------------------------------------------- use
    def latest(self) -> dict[str, Any]:
        """The last logged step's scalar metrics (per-channel lists left out)."""
        if not self.history:
            return {}
        return {k: v for k, v in self.history[-1].items() if not isinstance(v, list)}

    def remove(self) -> None:
        self._pre.remove()
        self._post.remove()

    def plot(self, path: str | Path, title: str | None = None, max_lines: int = 8) -> Path:
        """Effective learning rate and angular update per layer over the logged steps, as a PNG (matplotlib).

        Up to ``max_lines`` layers: one line each, legend beside the plots. More (a ResNet has 20+): the median
        over layers as a line, the 25–75 % and min–max ranges over layers as bands, so the plot stays readable.
        """
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np

        path = Path(path)
        rows = list(self.history)
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), layout="constrained")
        steps = np.asarray([r["step"] for r in rows])
        names = [name for name, _ in self.named_params]
        per_layer = len(names) <= self.max_layers
        for ax, key in zip(axes, ("effective_lr", "angular_update"), strict=True):
            if per_layer and len(names) <= max_lines:
                for name in names:
                    ax.plot(steps, [r.get(f"{key}/{name}", math.nan) for r in rows], label=name)
                continue
            if not rows:
                continue
            if per_layer:
                v = np.array([[r.get(f"{key}/{n}", math.nan) for n in names] for r in rows], dtype=float)
                lo, q25, med, q75, hi = (np.nanmin(v, 1), *np.nanpercentile(v, [25, 50, 75], axis=1),
                                         np.nanmax(v, 1))
            else:
                lo, q25, med, q75, hi = (np.array([r[f"{key}/{q}"] for r in rows]) for q, _ in QUANTILES)
            ax.fill_between(steps, lo, hi, alpha=0.15, color="C0", label=f"min–max of {len(names)} layers")
            ax.fill_between(steps, q25, q75, alpha=0.35, color="C0", label="25–75 % of layers")
            ax.plot(steps, med, color="C0", label="median layer")
        axes[0].set(yscale="log", xlabel="step",
                    ylabel="η/‖w_c‖" if self.adaptive else "η/‖w_c‖²", title="effective learning rate")
        axes[1].set(yscale="log", xlabel="step", ylabel="degrees", title="angular update per step")
        if per_layer and len(names) <= max_lines:
            fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize=7)
        else:
            axes[0].legend(fontsize=7)
        if title:
            fig.suptitle(title)
        atomic_savefig(fig, path, dpi=110)
        plt.close(fig)
        return path
