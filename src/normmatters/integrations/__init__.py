"""The weight-decay / effective-step tools of :mod:`normmatters.optim` inside other training loops.

* :mod:`normmatters.integrations.lightning`: ``EffectiveLRMonitor`` and ``WeightDecayMimicCallback``, Lightning
  callbacks (``pip install normmatters[lightning]``);
* :mod:`normmatters.integrations.transformers`: ``EffectiveLRCallback`` and ``WeightDecayMimicCallback`` for the
  Hugging Face ``Trainer`` (``pip install normmatters[transformers]``).

Each submodule imports its framework; this package imports none (``import normmatters`` never does either).
"""

__all__: list[str] = []
