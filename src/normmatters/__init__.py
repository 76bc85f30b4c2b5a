"""normmatters: cheaper, low-precision-safe, Gaussian-consistent normalization for PyTorch.

Public API (re-exports only); see README.md for a tour.

Names are loaded on first use (PEP 562 module ``__getattr__``), so ``import normmatters.cli`` — the
``normmatters`` command — does not import torch until a command needs it: ``normmatters --help`` stays fast.
``import normmatters as nm; nm.LpBatchNorm2d`` and ``from normmatters import LpBatchNorm2d`` work as before.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: sub-modules re-exported under their own name
_SUBMODULES = ("constants", "estimators", "functional")
#: name → sub-module that defines it (every public name of ``normmatters.nn`` is re-exported as well)
_NAMES = {
    "convert_batchnorm": "convert",
    "convert_sync_lp_batchnorm": "convert",
    "to_torch_batchnorm": "convert",
    "convert_norms": "convert_layer_norms",
    "to_torch_norms": "convert_layer_norms",
    "to_weight_norm_form": "weight_norm_form",
    "calibrate_norms": "calibrate",
    "Adapter": "adapters",
    "register_adapter": "adapters",
    "unregister_adapter": "adapters",
    "find_adapter": "adapters",
    "ConversionReport": "adapters",
    "CalibrationReport": "calibrate",
    "LayerCalibration": "calibrate",
    "norm_layer": "factory",
    "available_norms": "estimators",
    "get_estimator": "estimators",
    "lp_batch_norm": "functional",
    "NonFiniteBatchError": "functional",
    "NormOptions": "options",
    "lp_layer_norm": "layer_functional",
    "lp_rms_norm": "layer_functional",
    "lp_group_norm": "layer_functional",
}


def _nn_all() -> list[str]:
    return list(importlib.import_module(".nn", __name__).__all__)


def __getattr__(name: str) -> Any:
    if name == "__all__":
        return [*_SUBMODULES, *_NAMES, *_nn_all()]
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _NAMES:
        return getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
    if not name.startswith("_"):
        nn = importlib.import_module(".nn", __name__)
        if name in nn.__all__:
            return getattr(nn, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_SUBMODULES, *_NAMES, *_nn_all()})
