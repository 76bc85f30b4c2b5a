"""Watch the effective step size of scale-invariant weights during training."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..atomic_write import atomic_savefig
from .effective_step import norm_power
from .trajectory import channel_norms

__all__ = ["EffectiveLRMonitor"]


class EffectiveLRMonitor:
    """After every ``optimizer.step()`` (through a step post-hook) record, per named parameter:

    * ``norm``: ‖w‖₂;
    * ``effective_lr``: η/‖w‖² for SGD-like optimizers (a scale-invariant weight's gradient scales as 1/‖w‖,
      so its angular step is η‖∇_û L‖/‖w‖²), and η/‖w‖ for adaptive ones (Adam, AdamW, …), whose update size
      does not scale with the gradient; η is the current ``lr`` of the parameter's group, so schedulers are
      included;
    * ``angle_deg``: the angle between the weight before and after the step (mean over channels when
      ``per_channel``; each channel's angles are kept too).

    ``history`` is a list (one dict per step: ``{"step": k, "<name>/norm": …, …}``); :meth:`latest` gives the
    last row for the experiment metrics; :meth:`plot` writes a PNG. Call :meth:`remove` to detach the hook.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, named_params: Iterable[tuple[str, Tensor]],
                 per_channel: bool = False) -> None:
        self.optimizer = optimizer
        self.named_params = list(named_params)
        if not self.named_params:
            raise ValueError("EffectiveLRMonitor: got no parameters")
        self.per_channel = per_channel
        self.adaptive = norm_power(optimizer) == 1
        self.history: list[dict[str, Any]] = []
        # group indices, not the dicts: optimizer.load_state_dict replaces the dicts
        self._group_index: dict[str, int] = {}
        for name, p in self.named_params:
            index = next((i for i, g in enumerate(optimizer.param_groups) if any(p is q for q in g["params"])),
                         None)
            if index is None:
                raise ValueError(f"EffectiveLRMonitor: parameter {name!r} is not in the optimizer")
            self._group_index[name] = index
        self._before: dict[str, Tensor] = {}
        self._pre = optimizer.register_step_pre_hook(self._snapshot)
        self._post = optimizer.register_step_post_hook(self._record)

    def _snapshot(self, *_: Any) -> None:
        self._before = {name: p.detach().clone() for name, p in self.named_params}

    @torch.no_grad()
    def _record(self, *_: Any) -> None:
        row: dict[str, Any] = {"step": len(self.history) + 1}
        for name, p in self.named_params:
            w = p.detach()
            norm = torch.linalg.vector_norm(w).item()
            lr = self.optimizer.param_groups[self._group_index[name]]["lr"]
            lr = float(lr.item() if isinstance(lr, Tensor) else lr)
            row[f"{name}/norm"] = norm
            row[f"{name}/effective_lr"] = lr / norm if self.adaptive else lr / norm**2
            before = self._before.get(name)
            if before is not None:
                a, b = before.flatten(1) if w.dim() > 1 else before[None], w.flatten(1) if w.dim() > 1 else w[None]
                cos = torch.nn.functional.cosine_similarity(a, b, dim=1).clamp(-1, 1)
                angles = torch.rad2deg(torch.acos(cos))
                row[f"{name}/angle_deg"] = angles.mean().item()
                if self.per_channel:
                    row[f"{name}/channel_angle_deg"] = angles.tolist()
            if self.per_channel:
                cn = channel_norms(w)
                row[f"{name}/channel_norm"] = cn.tolist()
                row[f"{name}/channel_effective_lr"] = (lr / cn if self.adaptive else lr / cn.square()).tolist()
        self.history.append(row)

    def latest(self) -> dict[str, Any]:
        """The last step's scalar metrics (per-channel lists left out)."""
        if not self.history:
            return {}
        return {k: v for k, v in self.history[-1].items() if not isinstance(v, list)}

    def remove(self) -> None:
        self._pre.remove()
        self._post.remove()

    def plot(self, path: str | Path, title: str | None = None, max_lines: int = 8) -> Path:
        """Effective learning rate and angular update per layer over steps, as a PNG (matplotlib).

        Up to ``max_lines`` layers: one line each, legend beside the plots. More (a ResNet has 20+): the median
        over layers as a line, the 25–75 % and min–max ranges over layers as bands, so the plot stays readable.
        """
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np

        path = Path(path)
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), layout="constrained")
        steps = [r["step"] for r in self.history]
        keys = ("effective_lr", "angle_deg")
        names = [name for name, _ in self.named_params]
        for ax, key in zip(axes, keys, strict=True):
            values = np.array([[r.get(f"{n}/{key}", math.nan) for n in names] for r in self.history], dtype=float)
            if len(names) <= max_lines:
                for i, name in enumerate(names):
                    ax.plot(steps, values[:, i], label=name)
            elif len(steps):
                ok = np.isfinite(values).any(axis=1)
                s, v = np.asarray(steps)[ok], values[ok]
                ax.fill_between(s, np.nanmin(v, 1), np.nanmax(v, 1), alpha=0.15, color="C0",
                                label=f"min–max of {len(names)} layers")
                ax.fill_between(s, *np.nanpercentile(v, [25, 75], axis=1), alpha=0.35, color="C0",
                                label="25–75 % of layers")
                ax.plot(s, np.nanmedian(v, 1), color="C0", label="median layer")
        axes[0].set(yscale="log", xlabel="step",
                    ylabel="η/‖w‖" if self.adaptive else "η/‖w‖²", title="effective learning rate")
        axes[1].set(yscale="log", xlabel="step", ylabel="degrees", title="angular update per step")
        if len(names) <= max_lines:
            fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize=7)
        else:
            axes[0].legend(fontsize=7)
        if title:
            fig.suptitle(title)
        atomic_savefig(fig, path, dpi=110)
        plt.close(fig)
        return path
