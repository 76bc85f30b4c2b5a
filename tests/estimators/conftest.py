import pytest
import torch


@pytest.fixture
def gaussian():
    """(rows, n) float64 N(0, 1) samples from a fixed seed."""
    def make(rows: int, n: int, seed: int = 0) -> torch.Tensor:
        return torch.randn(rows, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return make
