from __future__ import annotations

import torch
import torch.nn.functional as F

from normmatters.experiments.augment import Augment, random_crop, random_hflip, standardize


def test_random_crop_matches_per_sample_slices():
    x = torch.randn(5, 2, 6, 7)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    out = random_crop(x, 2, g1)
    oy = torch.randint(0, 5, (5,), generator=g2)
    ox = torch.randint(0, 5, (5,), generator=g2)
    xp = F.pad(x, (2, 2, 2, 2))
    for i in range(5):
        assert torch.equal(out[i], xp[i, :, oy[i] : oy[i] + 6, ox[i] : ox[i] + 7])
    assert torch.equal(random_crop(x, 0, g1), x)


def test_hflip_and_standardize():
    x = torch.randn(4, 3, 2, 5)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(random_hflip(x, g, p=1.0), x.flip(-1))
    assert torch.equal(random_hflip(x, g, p=0.0), x)
    mean, std = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 4.0, 0.5])
    y = standardize(x, mean, std)
    assert torch.allclose(y[:, 1], (x[:, 1] - 2.0) / 4.0)


def test_augment_is_reproducible_and_eval_is_deterministic():
    x = torch.rand(8, 1, 8, 8)
    aug = Augment(torch.tensor([0.5]), torch.tensor([0.25]), crop_padding=2, hflip=True)
    a = aug(x, torch.Generator().manual_seed(1), train=True)
    b = aug(x, torch.Generator().manual_seed(1), train=True)
    assert torch.equal(a, b) and not torch.equal(a, aug(x, None, train=False))
    assert torch.equal(aug(x, torch.Generator().manual_seed(1), train=False), (x - 0.5) / 0.25)
