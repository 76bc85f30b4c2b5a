"""save_stats / saved_stats: what the out-of-place lean Functions keep for backward (no activation-sized
intermediate) and how they read it back."""

import torch

from normmatters.kernels.saved import save_stats, saved_stats


class _Ctx:
    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


def test_dividing_norm_round_trip_keeps_raw_and_aux():
    x, w, mean, raw, tau = torch.randn(4, 3), torch.ones(3), torch.zeros(3), torch.ones(3), torch.full((1, 3), 2.0)
    ctx = _Ctx()
    save_stats(ctx, x, w, True, mean, raw, (tau,))
    assert len(ctx.saved_tensors) == 5
    got = saved_stats(ctx)
    assert got[0] is x and got[1] is w and got[2] is mean and got[3] is raw and got[4] == (tau,)


def test_mean_only_saves_no_statistic():
    x, w, mean = torch.randn(4, 3), torch.ones(3), torch.zeros(3)
    ctx = _Ctx()
    save_stats(ctx, x, w, False, mean, torch.ones(3), (torch.ones(1, 3),))
    assert len(ctx.saved_tensors) == 3
    _, _, m, raw, aux = saved_stats(ctx)
    assert raw is m is mean and aux == ()
