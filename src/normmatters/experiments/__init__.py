"""The experiment harness behind ``normmatters compare`` and ``normmatters train``.

data (local datasets) → augment (torch-op augmentation) → models (``norm_layer`` builders) → trainer
(resumable runs; optim, checkpoint, metrics, distributed) → compare / report (the norm comparison).
Nothing in the core library imports from here.
"""
