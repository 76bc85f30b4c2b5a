"""In-memory datasets and the memory check that guards building them."""

import pytest
import torch

import normmatters.experiments.arrays as A


def test_array_dataset_names_itself_for_wrong_shapes():
    with pytest.raises(A.DataError, match=r"ArrayDataset: expected images of shape \(N, C, H, W\), got \(4, 8\)"):
        A.ArrayDataset(torch.zeros(4, 8), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(A.DataError, match="expected 4 labels, got shape"):
        A.ArrayDataset(torch.zeros(4, 1, 2, 2), torch.zeros(3, dtype=torch.int64))


def test_fixed_split_is_disjoint_and_reproducible():
    images, labels = torch.rand(10, 1, 2, 2), torch.arange(10)
    a, b = A.fixed_split(images, labels, [], "x"), A.fixed_split(images, labels, [], "x")
    assert len(a.test) == 2 and len(a.train) == 8 and torch.equal(a.test.labels, b.test.labels)
    assert not set(a.test.labels.tolist()) & set(a.train.labels.tolist())


def test_check_fits_refuses_what_memory_cannot_hold(monkeypatch, tmp_path):
    monkeypatch.setattr(A, "available_memory", lambda: 100 * A.BYTES_PER_VALUE)
    A.check_fits(tmp_path / "f", 100, "its images")  # fits exactly
    with pytest.raises(A.DataError, match=r"f: its images \(101 values.*would not fit"):
        A.check_fits(tmp_path / "f", 101, "its images")
