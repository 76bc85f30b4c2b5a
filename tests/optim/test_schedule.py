import math

import pytest
import torch
from torch import nn

from normmatters.optim import EffectiveLRMonitor, NormSchedule


def _net():
    torch.manual_seed(0)
    # every trainable parameter is scale-invariant (conv before affine-free batch norm)
    return nn.Sequential(nn.Conv2d(3, 6, 3, bias=False), nn.BatchNorm2d(6, affine=False), nn.ReLU(),
                         nn.Conv2d(6, 4, 3, bias=False), nn.BatchNorm2d(4, affine=False), nn.Flatten())


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_norm_schedule_equals_rate_schedule(momentum):
    data = [torch.randn(8, 3, 7, 7, generator=torch.Generator().manual_seed(i)) for i in range(30)]
    target = torch.randn(8, 4 * 3 * 3, generator=torch.Generator().manual_seed(99))
    a, b = _net(), _net()
    oa = torch.optim.SGD(a.parameters(), lr=0.05, momentum=momentum)
    ob = torch.optim.SGD(b.parameters(), lr=0.05, momentum=momentum)
    rate = torch.optim.lr_scheduler.MultiStepLR(oa, milestones=[10, 20], gamma=0.1)
    norm = NormSchedule(list(b.parameters()), milestones=[10, 20], factors=10, optimizer=ob)
    ma = EffectiveLRMonitor(oa, list(a.named_parameters()))
    mb = EffectiveLRMonitor(ob, list(b.named_parameters()))
    for x in data:
        for net, opt in ((a, oa), (b, ob)):
            opt.zero_grad()
            nn.functional.mse_loss(net(x), target).backward()
            opt.step()
        rate.step()
        norm.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        cos = nn.functional.cosine_similarity(pa.detach().flatten(), pb.detach().flatten(), dim=0)
        assert cos.item() > 1 - 1e-6
        assert pb.norm().item() == pytest.approx(pa.norm().item() * 10, rel=1e-4)  # √10 · √10
    for ra, rb in zip(ma.history, mb.history):
        for key in ra:
            if key.startswith("effective_lr/"):
                assert rb[key] == pytest.approx(ra[key], rel=1e-4)


def test_schedule_arguments():
    p = [nn.Parameter(torch.ones(2, 2))]
    s = NormSchedule(p, [2, 5], [4, 9])
    assert s.scale_at(1) == 1 and s.scale_at(2) == 2 and s.scale_at(7) == 6
    with pytest.raises(ValueError, match="milestones must increase"):
        NormSchedule(p, [5, 2], 10)
    with pytest.raises(ValueError, match="2 milestones but 1 factors"):
        NormSchedule(p, [2, 5], [10])
    with pytest.raises(ValueError, match="factors must be positive"):
        NormSchedule(p, [2], [-1])
    assert NormSchedule(p, [2], 4, adaptive=True).scale_at(3) == 4
    assert math.isclose(NormSchedule(p, [2], 4).scale_at(3), 2)
