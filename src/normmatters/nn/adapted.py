"""Lp layers that keep what a model zoo's norm class does besides normalizing (built by the conversion adapters of
:mod:`normmatters.adapters`; usable directly too).

* :class:`LpLayerNorm2d` — channels-first layer norm over dim 1 of (N, C, *) input (timm's and torchvision's
  ConvNeXt ``LayerNorm2d``: ``F.layer_norm`` on ``x.permute(0, 2, 3, 1)``, permuted back).
* :class:`LpBatchNormAct2d`, :class:`LpGroupNormAct`, :class:`LpLayerNormAct`, :class:`LpLayerNormAct2d` — norm then
  ``self.drop`` then ``self.act`` (timm's ``BatchNormAct2d`` / ``GroupNormAct`` / ``LayerNormAct`` /
  ``LayerNormAct2d``): the activation and dropout modules are the original's.
* :class:`LpHFRMSNorm` — the RMS norms of Hugging Face transformers, with each family's numerics: statistics in
  float32 and ``cast`` deciding where the result returns to the input dtype — ``"llama"`` (Llama, Mistral,
  Qwen2/3, Phi-3: ``weight · y.to(input dtype)``), ``"gemma"`` (Gemma, Gemma 2: ``(y · (1 + weight)).to(input
  dtype)``, the weight stored as an offset from 1) and ``"t5"`` (``T5LayerNorm``: ``y`` cast to a half weight's
  dtype, then ``weight · y``).

The state_dict keys are the original classes' (same parameter and buffer names, ``act.*`` / ``drop.*`` children).
``_nm_norm_input`` (the input as the parent Lp class sees it), ``_nm_gain`` and ``_nm_scale_gain`` (the effective
gain, e.g. ``1 + weight``, and how to scale it) are read by :func:`normmatters.calibrate_norms`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..layer_functional import lp_rms_norm
from .batchnorm import LpBatchNorm2d
from .layernorm import LpGroupNorm, LpLayerNorm, LpRMSNorm

__all__ = ["LpLayerNorm2d", "LpBatchNormAct2d", "LpGroupNormAct", "LpLayerNormAct", "LpLayerNormAct2d",
           "LpHFRMSNorm"]

#: the ``cast`` forms of :class:`LpHFRMSNorm`
HF_RMS_CASTS = ("llama", "gemma", "t5")


class LpLayerNorm2d(LpLayerNorm):
    """Channels-first :class:`~normmatters.nn.LpLayerNorm`: (N, C, *) input normalized over C at every position
    (``normalized_shape`` = (C,)); y = weight · (x − μ) / sqrt(σ̂² + eps) + bias along dim 1."""

    def _nm_norm_input(self, x: Tensor) -> Tensor:
        return x.movedim(1, -1)

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() < 2:
            raise ValueError(f"{type(self).__name__}: expected (N, C, *) input, got shape {list(input.shape)}")
        return super().forward(input.movedim(1, -1)).movedim(-1, 1)


def _act_init(self: nn.Module, act: nn.Module | None, drop: nn.Module | None) -> None:
    self.drop = drop if drop is not None else nn.Identity()
    self.act = act if act is not None else nn.Identity()


class LpBatchNormAct2d(LpBatchNorm2d):
    """:class:`~normmatters.nn.LpBatchNorm2d` then ``drop`` then ``act`` (keyword-only modules, default
    ``nn.Identity``); other arguments as ``LpBatchNorm2d``."""

    def __init__(self, num_features: int, *args, act: nn.Module | None = None, drop: nn.Module | None = None,
                 **kwargs) -> None:
        super().__init__(num_features, *args, **kwargs)
        _act_init(self, act, drop)

    def forward(self, input: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(input)))


class LpGroupNormAct(LpGroupNorm):
    """:class:`~normmatters.nn.LpGroupNorm` then ``drop`` then ``act``."""

    def __init__(self, num_groups: int, num_channels: int, *args, act: nn.Module | None = None,
                 drop: nn.Module | None = None, **kwargs) -> None:
        super().__init__(num_groups, num_channels, *args, **kwargs)
        _act_init(self, act, drop)

    def forward(self, input: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(input)))


class LpLayerNormAct(LpLayerNorm):
    """:class:`~normmatters.nn.LpLayerNorm` then ``drop`` then ``act``."""

    def __init__(self, normalized_shape, *args, act: nn.Module | None = None, drop: nn.Module | None = None,
                 **kwargs) -> None:
        super().__init__(normalized_shape, *args, **kwargs)
        _act_init(self, act, drop)

    def forward(self, input: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(input)))


class LpLayerNormAct2d(LpLayerNorm2d):
    """:class:`LpLayerNorm2d` (channels-first) then ``drop`` then ``act``."""

    def __init__(self, normalized_shape, *args, act: nn.Module | None = None, drop: nn.Module | None = None,
                 **kwargs) -> None:
        super().__init__(normalized_shape, *args, **kwargs)
        _act_init(self, act, drop)

    def forward(self, input: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(input)))


class LpHFRMSNorm(LpRMSNorm):
    """A Hugging Face transformers RMS norm with σ̂ from ``norm`` (uncentered, over the last dim), computed in
    float32 as the original: y = x / sqrt(σ̂² + eps), then (``cast``) ``"llama"``: ``weight · y.to(x.dtype)``;
    ``"gemma"``: ``(y · (1 + weight.float())).to(x.dtype)``; ``"t5"``: ``weight · y`` with y cast to the weight's
    dtype when that is float16 / bfloat16. ``hidden_size``, ``eps`` and the estimator options as
    :class:`~normmatters.nn.LpRMSNorm` (always affine). ``norm="l2"`` reproduces the original class."""

    def __init__(self, hidden_size: int, norm: str = "l1", eps: float = 1e-6, cast: str = "llama", device=None,
                 dtype=None, k: int = 10, chunks: int | None = None, impl: str | None = None) -> None:
        if cast not in HF_RMS_CASTS:
            raise ValueError(f"{type(self).__name__}: cast must be one of {HF_RMS_CASTS}, got {cast!r}")
        super().__init__(hidden_size, norm=norm, eps=eps, elementwise_affine=True, device=device, dtype=dtype, k=k,
                         chunks=chunks, impl=impl)
        self.cast = cast
        if cast == "gemma":
            with torch.no_grad():
                self.weight.zero_()  # stored as the offset from 1, as Gemma does

    def _nm_gain(self) -> Tensor:
        return 1.0 + self.weight.float() if self.cast == "gemma" else self.weight

    @torch.no_grad()
    def _nm_scale_gain(self, f: Tensor) -> None:
        f = f.to(torch.float32)
        if self.cast == "gemma":
            self.weight.copy_(((1.0 + self.weight.float()) * f - 1.0).to(self.weight.dtype))
        else:
            self.weight.mul_(f.to(self.weight.dtype))

    def forward(self, input: Tensor) -> Tensor:
        y = lp_rms_norm(input.to(torch.float32), self.normalized_shape, None, self.eps, self.norm,
                        where=type(self).__name__, k=self.k, chunks=self.chunks, impl=self.impl)
        if self.cast == "llama":
            return self.weight * y.to(input.dtype)
        if self.cast == "gemma":
            return (y * (1.0 + self.weight.float())).type_as(input)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            y = y.to(self.weight.dtype)
        return self.weight * y

    def extra_repr(self) -> str:
        return super().extra_repr() + f", cast={self.cast!r}"
