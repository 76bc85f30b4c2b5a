"""ResNet-20 (He et al. 2016, CIFAR variant: 3 stages of 3 basic blocks, 16/32/64 channels) for
``normmatters bench``: one SGD training step with each norm, and with the paper's weight-norm forms, against the
same step with ``nn.BatchNorm2d``."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .bench_measure import interleaved, median, ratio, unique_saved_bytes
from .nn.batchnorm import LpBatchNorm2d
from .weight_norm_form import to_weight_norm_form

__all__ = ["WEIGHT_NORM_VARIANTS", "bench_resnet20", "resnet20"]


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))

    def forward(self, x: Tensor) -> Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.short is None else self.short(x)))


def resnet20(norm: Callable[[int], nn.Module], num_classes: int = 10) -> nn.Module:
    """ResNet-20 for 32×32 inputs with ``norm(num_features)`` as its normalization layer."""
    layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), norm(16), nn.ReLU()]
    cin = 16
    for cout, stride in ((16, 1), (32, 2), (64, 2)):
        for i in range(3):
            layers.append(_Block(cin, cout, stride if i == 0 else 1, norm))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes)]
    return nn.Sequential(*layers)


#: ResNet-20 variants besides the Lp norms: the paper's weight-norm form (Hoffer et al. 2018, sec. 6) —
#: (bounded) weight norm on every conv/linear weight + mean-only batch norm with a learned bias
WEIGHT_NORM_VARIANTS = ("wn+mean", "bwn+mean")


def _resnet20_variant(name: str, device: torch.device) -> nn.Module:

    torch.manual_seed(0)
    if name == "bn":
        return resnet20(nn.BatchNorm2d).to(device).train()
    if name in WEIGHT_NORM_VARIANTS:
        model = resnet20(nn.BatchNorm2d)
        return to_weight_norm_form(model, bounded=name.startswith("bwn")).to(device).train()
    return resnet20(lambda c: LpBatchNorm2d(c, norm=name)).to(device).train()


def bench_resnet20(norms: Iterable[str], device: torch.device, rounds: int, batch: int = 128,
                   weight_norm: bool = True) -> dict[str, Any]:
    """One SGD training step of ResNet-20 with each norm (and, with ``weight_norm``, the WN / bounded-WN +
    mean-only-BN forms) against the same step with nn.BatchNorm2d: median time ratios (``step``), ratios of
    the activation memory saved for backward (``saved``) and the nn.BatchNorm2d step in ms (``bn_ms``)."""
    x = torch.randn(batch, 3, 32, 32, device=device)
    t = torch.randint(0, 10, (batch,), device=device)
    names = ("bn", *norms, *(WEIGHT_NORM_VARIANTS if weight_norm else ()))
    steps: dict[str, Callable[[], None]] = {}
    saved: dict[str, int] = {}
    for name in names:
        model = _resnet20_variant(name, device)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)

        def step(model=model, opt=opt) -> None:
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), t).backward()
            opt.step()
        steps[name] = step
        step()  # warm-up (compilation) outside the saved-bytes count
        saved[name] = unique_saved_bytes(lambda model=model: nn.functional.cross_entropy(model(x), t))
    times = interleaved(steps, rounds, device)
    return {"bn_ms": median(times["bn"]) * 1e3,
            "step": {name: ratio(times, name, "bn") for name in names[1:]},
            "saved": {name: saved[name] / saved["bn"] for name in names[1:]}}
