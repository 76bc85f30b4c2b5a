"""The Triton kernels' tests: on a CUDA test device they run the compiled kernels; on the CPU they run them under
Triton's interpreter: ``TRITON_INTERPRET=1`` is set here, before this folder's tests import Triton, and stays set
for the session (Triton fixes interpreted vs compiled when it defines each kernel, its own standard library
included, so the setting cannot be undone once Triton is imported). Without an importable
``triton`` every test here is skipped with that reason."""

import importlib.util
import os

import pytest

from devices import resolve

HAS_TRITON = importlib.util.find_spec("triton") is not None

if HAS_TRITON and resolve().type == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_collection_modifyitems(config, items):
    if HAS_TRITON:
        return
    skip = pytest.mark.skip(reason="triton is not importable here (pip install triton; the test extra brings it)")
    for item in items:
        if "kernels/triton/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(skip)
