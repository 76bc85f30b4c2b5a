"""Model builders that take ``norm_layer`` (a name or a callable, through :func:`normmatters.norm_layer`).

* :class:`CifarResNet` — He et al. 2016 ("Deep residual learning", §4.2): depth 6n+2, three stages of n basic
  blocks with 16/32/64 × ``width`` channels, strides 1/2/2, global average pooling.
  ResNet-20/32/56 are n = 3/5/9; ``resnet8`` (n = 1) is the small residual CNN of ``normmatters compare``.
  Shortcuts that change shape are a
  1×1 convolution + norm (option B) rather than the paper's zero padding (option A), so every block has a
  normalized shortcut when it needs one.
* :class:`VGG` — Simonyan & Zisserman 2015 configurations A (VGG-11) and D (VGG-16) with a norm after every
  convolution; max-pools are skipped once the feature map is 1×1 so small inputs (8×8) work; a single linear
  classifier after global average pooling.
* :class:`MLP` — flatten → [Linear → norm → ReLU] × len(hidden) → Linear.

Inputs are (N, C, H, W); every model adapts to ``in_channels``, the image size and ``num_classes``.
Convolutions before a norm have no bias (the norm's shift makes it redundant).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from ..factory import norm_layer as _norm_layer

__all__ = ["CifarResNet", "BasicBlock", "VGG", "MLP", "RowLSTM", "build_model", "MODEL_NAMES", "resolve_norm"]

NormSpec = str | Callable[..., nn.Module]


def resolve_norm(norm: NormSpec, dim: int = 2, **options: Any) -> Callable[..., nn.Module]:
    """A ``f(num_features) -> nn.Module`` for ``norm`` (name or callable) with ``options`` bound."""
    return _norm_layer(norm, dim=dim, **options)


class BasicBlock(nn.Module):
    """conv3×3 → norm → ReLU → conv3×3 → norm, plus identity (or 1×1 conv → norm) shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int, norm: Callable[..., nn.Module]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = norm(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = norm(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), norm(planes))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR-style ResNet of depth 6n+2 (He et al. 2016, §4.2) with a pluggable normalization."""

    def __init__(
        self,
        depth: int = 20,
        norm_layer: NormSpec = "bn",
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 1,
        **norm_options: Any,
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(
                f"CifarResNet: depth must be 6n+2 with n ≥ 1 (8, 14, 20, 32, 56, …), got {depth}"
            )
        n = (depth - 2) // 6
        norm = resolve_norm(norm_layer, 2, **norm_options)
        w = [16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(in_channels, w[0], 3, 1, 1, bias=False)
        self.bn1 = norm(w[0])
        self.relu = nn.ReLU(inplace=True)
        layers: list[nn.Module] = []
        in_planes = w[0]
        for stage, planes in enumerate(w):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                layers.append(BasicBlock(in_planes, planes, stride, norm))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.pool(self.layers(x)).flatten(1)
        return self.fc(x)


VGG_CONFIGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """VGG-11/16 with a norm after every 3×3 convolution; pools stop at 1×1; GAP → linear classifier."""

    def __init__(
        self,
        config: str = "vgg11",
        norm_layer: NormSpec = "bn",
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int | Sequence[int] = 32,
        width: float = 1.0,
        **norm_options: Any,
    ) -> None:
        super().__init__()
        if config not in VGG_CONFIGS:
            raise ValueError(f"VGG: config must be one of {sorted(VGG_CONFIGS)}, got {config!r}")
        norm = resolve_norm(norm_layer, 2, **norm_options)
        h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        layers: list[nn.Module] = []
        c = in_channels
        for v in VGG_CONFIGS[config]:
            if v == "M":
                if min(h, w) >= 2:
                    layers.append(nn.MaxPool2d(2))
                    h, w = h // 2, w // 2
                continue
            out = max(1, int(int(v) * width))
            layers += [nn.Conv2d(c, out, 3, padding=1, bias=False), norm(out), nn.ReLU(inplace=True)]
            c = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


class MLP(nn.Module):
    """flatten → [Linear (no bias) → norm (1d) → ReLU] × len(hidden) → Linear."""

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int] = (256, 256),
        norm_layer: NormSpec = "bn",
        num_classes: int = 10,
        **norm_options: Any,
    ) -> None:
        super().__init__()
        norm = resolve_norm(norm_layer, 1, **norm_options)
        layers: list[nn.Module] = [nn.Flatten()]
        f = in_features
        for h in hidden:
            layers += [nn.Linear(f, h, bias=False), norm(h), nn.ReLU(inplace=True)]
            f = h
        layers.append(nn.Linear(f, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


MODEL_NAMES = ("resnet8", "resnet20", "resnet32", "resnet56", "vgg11", "vgg16", "mlp", "lstm")


class RowLSTM(nn.Module):
    """Read an image row by row as a sequence: (N, C, H, W) → H steps of C·W features → LSTM → linear.

    A recurrent model that runs in seconds on the embedded digits (8 steps of 8 features), for the weight-norm
    study: it has no normalization layers (batch norm does not apply to recurrences), so ``norm`` must be
    "none"; weight norm goes on its ``weight_ih_l*`` / ``weight_hh_l*`` rows.
    """

    def __init__(self, features: int, hidden: int, num_classes: int, layers: int = 1) -> None:
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, num_layers=layers)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        seq = x.permute(2, 0, 1, 3).flatten(2)  # (H, N, C·W)
        out, _ = self.lstm(seq)
        return self.fc(out[-1])


#: the ``norm`` values that mean "no normalization layers"
_NO_NORM = ("none", None)

def build_model(
    name: str,
    norm: NormSpec = "bn",
    *,
    in_channels: int = 3,
    image_size: int | Sequence[int] = 32,
    num_classes: int = 10,
    width: int = 1,
    **norm_options: Any,
) -> nn.Module:
    """Build ``name`` (one of :data:`MODEL_NAMES`) for the given input and class count.

    ``norm`` and ``norm_options`` go to :func:`normmatters.norm_layer` (dim 2 for the CNNs, 1 for the MLP).
    """
    key = name.lower()
    if key.startswith("resnet") and key[6:].isdigit():
        return CifarResNet(int(key[6:]), norm, num_classes, in_channels, width, **norm_options)
    if key in VGG_CONFIGS:
        return VGG(key, norm, num_classes, in_channels, image_size, width, **norm_options)
    if key == "lstm":
        if norm not in _NO_NORM:
            raise ValueError(f"build_model: the lstm model has no normalization layers; use norm='none', got {norm!r}")
        w = image_size if isinstance(image_size, int) else tuple(image_size)[1]
        return RowLSTM(in_channels * w, 64 * width, num_classes)
    if key == "mlp":
        h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        return MLP(
            in_channels * h * w, tuple(256 * width for _ in range(2)), norm, num_classes, **norm_options
        )
    raise ValueError(f"build_model: unknown model {name!r}; expected one of {MODEL_NAMES} or resnet<6n+2>")
