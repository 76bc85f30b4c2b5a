import math

import pytest
import torch
from torch import nn

from normmatters.optim import EffectiveLRMonitor


def test_records_norm_effective_lr_and_angle(tmp_path):
    w = nn.Parameter(torch.randn(4, 3))
    opt = torch.optim.SGD([w], lr=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    mon = EffectiveLRMonitor(opt, [("w", w)], per_channel=True)
    for _ in range(3):
        before = w.detach().clone()
        w.grad = torch.randn(4, 3)
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        row = mon.latest()
        assert row["w/norm"] == pytest.approx(w.norm().item())
        assert row["w/effective_lr"] == pytest.approx(lr / w.norm().item() ** 2)
        cos = nn.functional.cosine_similarity(before, w.detach(), dim=1)
        assert row["w/angle_deg"] == pytest.approx(torch.rad2deg(torch.acos(cos)).mean().item(), rel=1e-5)
    assert [r["step"] for r in mon.history] == [1, 2, 3]
    assert len(mon.history[-1]["w/channel_effective_lr"]) == 4
    assert mon.plot(tmp_path / "elr.png").stat().st_size > 1000
    mon.remove()
    opt.step()
    assert len(mon.history) == 3


def test_adam_uses_lr_over_norm():
    w = nn.Parameter(torch.randn(4, 3))
    opt = torch.optim.AdamW([w], lr=0.01)
    mon = EffectiveLRMonitor(opt, [("w", w)])
    w.grad = torch.randn(4, 3)
    opt.step()
    assert mon.latest()["w/effective_lr"] == pytest.approx(0.01 / w.norm().item())
    assert not math.isnan(mon.latest()["w/angle_deg"])


def test_unknown_parameter():
    opt = torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=0.1)
    with pytest.raises(ValueError, match="parameter 'x' is not in the optimizer"):
        EffectiveLRMonitor(opt, [("x", nn.Parameter(torch.ones(2)))])


def test_plot_of_many_layers_aggregates(tmp_path, monkeypatch):
    """20+ layers: a median line and bands over layers, not a line (and legend entry) per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.figure

    ws = [nn.Parameter(torch.randn(4, 3)) for _ in range(21)]
    opt = torch.optim.SGD(ws, lr=0.1)
    mon = EffectiveLRMonitor(opt, [(f"layer{i}.weight", w) for i, w in enumerate(ws)])
    for _ in range(4):
        for w in ws:
            w.grad = torch.randn(4, 3)
        opt.step()
    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a, **k: saved.append(self))
    mon.plot(tmp_path / "many.png")
    (fig,) = saved
    ax = fig.axes[0]
    assert len(ax.lines) == 1 and ax.lines[0].get_label() == "median layer"
    labels = ax.get_legend_handles_labels()[1]
    assert labels == ["min–max of 21 layers", "25–75 % of layers", "median layer"]
    few = EffectiveLRMonitor(opt, [(f"layer{i}.weight", w) for i, w in enumerate(ws[:3])])
    opt.step()
    saved.clear()
    few.plot(tmp_path / "few.png")
    assert len(saved[0].axes[0].lines) == 3 and len(saved[0].legends) == 1
