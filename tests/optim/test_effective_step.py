import torch
from torch import nn

from normmatters.optim import effective_step, norm_power


def test_effective_step_formula():
    norms = torch.tensor([1.0, 2.0, 4.0])
    torch.testing.assert_close(effective_step(0.1, norms), torch.tensor([0.1, 0.025, 0.00625], dtype=torch.float64))
    torch.testing.assert_close(effective_step(0.1, norms, torch.tensor([2.0, 1.0, 4.0]), power=1),
                               torch.tensor([0.2, 0.05, 0.1], dtype=torch.float64))
    p = nn.Parameter(torch.ones(2, 2))
    assert norm_power(torch.optim.SGD([p], lr=0.1)) == 2
    assert norm_power(torch.optim.AdamW([p])) == 1 and norm_power(torch.optim.Adam([p])) == 1
