"""Fixtures for the harness tests: a small, fixed slice of the embedded digits dataset."""

from __future__ import annotations

import pytest
import torch

from normmatters.experiments.data import ArrayDataset, DataSplit, load_digits


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def digits() -> DataSplit:
    return load_digits()


@pytest.fixture(scope="session")
def tiny(digits: DataSplit) -> DataSplit:
    """192 training and 64 test digits: 3 steps per epoch at batch 64."""
    tr, te = digits.train, digits.test
    return DataSplit(
        "tiny-digits",
        ArrayDataset(tr.images[:192], tr.labels[:192], tr.classes),
        ArrayDataset(te.images[:64], te.labels[:64], te.classes),
    )
