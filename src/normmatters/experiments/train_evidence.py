"""Training evidence: the same small network trained with emulated low-precision normalization.

An MLP 64 → 128 → 128 → 10 with ``LpBatchNorm1d(norm, precision=...)`` after each hidden linear layer
(ReLU after the norm) is trained on scikit-learn's embedded ``load_digits`` (1797 8×8 images, a fixed
stratified 80/20 split) with SGD (momentum 0.9, lr 0.1, batch 128), for each norm and precision. Only
the normalization forward is emulated (straight-through backward, :mod:`normmatters.precision.layer`);
linear layers, loss and optimizer stay float32 — the experiment isolates the claim of Hoffer et al. 2018
(sec. 4) that L2 batch norm needs high precision while L1/L∞/range do not.

``input_scale`` multiplies the raw pixels (0…16). At scale 1 the pre-activations stay far below fp16's
limits; at 32 their deviations reach the hundreds, where fp16 (x − μ)² overflows. A run *diverged* when the
training loss became non-finite; ``nonfinite="ignore"`` keeps the layers from raising so the run continues
(and shows whether it recovers). A run whose emulated statistics overflow (fp16 l2 at scale 32) outputs each
layer's bias; it then stays at chance accuracy with a finite loss (constant channels have finite gradients).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..nn import LpBatchNorm1d

__all__ = ["TrainResult", "load_digits_split", "train_one", "run_evidence", "evidence_table"]

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    norm: str
    precision: str
    input_scale: float
    test_acc: float
    final_loss: float
    nonfinite_steps: int
    steps: int

    @property
    def diverged(self) -> bool:
        return self.nonfinite_steps > 0


def load_digits_split(seed: int = 0):
    """(x_train, y_train, x_test, y_test) float32/int64 tensors; raw pixel values 0…16."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    xtr, xte, ytr, yte = train_test_split(d.data, d.target, test_size=0.2, random_state=seed,
                                          stratify=d.target)
    f = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return f(xtr), torch.tensor(ytr), f(xte), torch.tensor(yte)


def _model(norm: str, precision: str | None, width: int = 128) -> nn.Module:
    def bn() -> nn.Module:
        return LpBatchNorm1d(width, norm=norm, precision=precision, nonfinite="ignore")

    return nn.Sequential(nn.Linear(64, width), bn(), nn.ReLU(), nn.Linear(width, width), bn(), nn.ReLU(),
                         nn.Linear(width, 10))


def train_one(norm: str, precision: str | None, input_scale: float = 1.0, epochs: int = 8,
              batch_size: int = 128, lr: float = 0.1, seed: int = 0, data=None) -> TrainResult:
    """Train one configuration; returns test accuracy (eval mode, running statistics) and divergence."""
    xtr, ytr, xte, yte = data if data is not None else load_digits_split(seed)
    torch.manual_seed(seed)
    model = _model(norm, precision)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    bad = steps = 0
    loss_v = math.nan
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(perm) - batch_size + 1, batch_size):
            idx = perm[i:i + batch_size]
            loss = nn.functional.cross_entropy(model(xtr[idx] * input_scale), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            loss_v = loss.item()
            bad += not math.isfinite(loss_v)
    model.eval()
    with torch.no_grad():
        out = model(xte * input_scale)
        acc = float((out.argmax(1) == yte).float().mean()) if torch.isfinite(out).all() else 0.0
    res = TrainResult(norm, precision or "fp32 (native)", input_scale, acc, loss_v, bad, steps)
    log.info("train %s %s x%g: acc %.3f, non-finite steps %d/%d", norm, res.precision, input_scale, acc,
             bad, steps)
    return res


def run_evidence(norms=("l2", "l1", "linf", "range"),
                 precisions=(None, "fp16", "fp8_e4m3", "fp8_e5m2", "int8"),
                 input_scales=(1.0, 32.0), epochs: int = 8, seed: int = 0) -> list[TrainResult]:
    data = load_digits_split(seed)
    return [train_one(n, p, s, epochs=epochs, seed=seed, data=data)
            for s in input_scales for n in norms for p in precisions]


def evidence_table(results: list[TrainResult]) -> str:
    """Markdown: rows (input scale, norm), columns precision; cells 'test acc' (+ 'diverged k/N')."""
    precs = list(dict.fromkeys(r.precision for r in results))
    lines = ["| input scale | norm | " + " | ".join(precs) + " |", "|---|---|" + "---|" * len(precs)]
    keys = list(dict.fromkeys((r.input_scale, r.norm) for r in results))
    for s, n in keys:
        cells = []
        for p in precs:
            r = next((r for r in results if (r.input_scale, r.norm, r.precision) == (s, n, p)), None)
            if r is None:
                cells.append("")
            else:
                cells.append(f"{r.test_acc:.3f}" + (f" (diverged {r.nonfinite_steps}/{r.steps})"
                                                    if r.diverged else ""))
        lines.append(f"| ×{s:g} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
