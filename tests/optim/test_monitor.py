import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from normmatters.optim import EffectiveLRMonitor, equilibrium_angular_update


class Ops(TorchDispatchMode):
    """Counts clones and host reads (.item(), bool(t), …) by the aten ops they run."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))

    def count(self, *funcs):
        return sum(op in funcs for op in self.ops)


READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default)


def _channel_angles(a, b):
    cos = nn.functional.cosine_similarity(a.double(), b.double(), dim=1).clamp(-1, 1)
    return torch.rad2deg(torch.acos(cos))


def test_records_metric_first_effective_lr_angle_and_norm(tmp_path):
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
        elr = lr / before.norm(dim=1).double() ** 2
        assert row["effective_lr/w"] == pytest.approx(elr.mean().item())
        assert row["angular_update/w"] == pytest.approx(_channel_angles(before, w.detach()).mean().item(), rel=1e-6)
        assert row["norm/w"] == pytest.approx(w.norm().item())
        assert mon.history[-1]["channel_effective_lr/w"] == pytest.approx(elr.tolist())
    assert [r["step"] for r in mon.history] == [1, 2, 3]
    assert "angular_update/equilibrium" not in mon.latest()  # no weight decay, no equilibrium
    assert mon.plot(tmp_path / "elr.png").stat().st_size > 1000
    mon.remove()
    opt.step()
    assert len(mon.history) == 3


def test_adam_uses_lr_over_norm_and_has_no_equilibrium():
    w = nn.Parameter(torch.randn(4, 3))
    opt = torch.optim.AdamW([w], lr=0.01, weight_decay=0.1)
    mon = EffectiveLRMonitor(opt, [("w", w)])
    before = w.detach().clone()
    w.grad = torch.randn(4, 3)
    opt.step()
    assert mon.latest()["effective_lr/w"] == pytest.approx((0.01 / before.norm(dim=1)).mean().item(), rel=1e-6)
    assert not math.isnan(mon.latest()["angular_update/w"])
    assert not any("equilibrium" in k for k in mon.latest())


def test_equilibrium_and_factors():
    w = nn.Parameter(torch.randn(4, 3))
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9, weight_decay=5e-4)
    factors = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    mon = EffectiveLRMonitor(opt, [("w", w)], factors=lambda: [factors])
    before = w.detach().clone()
    w.grad = torch.randn(4, 3)
    opt.step()
    row = mon.latest()
    assert row["angular_update/equilibrium"] == pytest.approx(math.degrees(equilibrium_angular_update(0.1, 5e-4, 0.9)))
    assert row["effective_lr/w"] == pytest.approx((0.1 * factors / before.norm(dim=1).double() ** 2).mean().item())
    other = EffectiveLRMonitor(torch.optim.SGD([w], lr=0.1), [("w", w)], weight_decay=1e-3)  # e.g. a mimic's λ
    other.optimizer.step()
    assert other.latest()["angular_update/equilibrium"] == pytest.approx(
        math.degrees(equilibrium_angular_update(0.1, 1e-3)))


def test_steps_that_log_nothing_cost_no_clone_and_no_read():
    ws = [nn.Parameter(torch.randn(8, 3, 3, 3)) for _ in range(3)]
    opt = torch.optim.SGD(ws, lr=0.1, momentum=0.9)
    for w in ws:
        w.grad = torch.randn_like(w)
    opt.step()  # momentum buffers exist: later steps run the same ops
    with Ops() as plain:
        opt.step()
    mon = EffectiveLRMonitor(opt, [(f"w{i}", w) for i, w in enumerate(ws)], every_n_steps=3, max_history=2)
    rows = []
    mon.sink = rows.append
    with Ops() as quiet:
        opt.step()  # step 1 of 3: logs nothing
    assert quiet.ops == plain.ops and not mon.history
    opt.step()
    with Ops() as logging:
        opt.step()  # step 3: logs, one transfer for all three weights
    assert logging.count(*READS) <= 1
    assert [r["step"] for r in mon.history] == [3] and rows == list(mon.history)
    for _ in range(9):
        opt.step()
    assert [r["step"] for r in mon.history] == [9, 12]  # bounded: the last max_history rows
    assert len(rows) == 4


def test_writer_gets_the_scalars():
    class Writer:
        def __init__(self):
            self.calls = []

        def add_scalar(self, tag, value, step):
            self.calls.append((tag, value, step))

    w = nn.Parameter(torch.randn(4, 3))
    opt = torch.optim.SGD([w], lr=0.1)
    writer = Writer()
    EffectiveLRMonitor(opt, [("conv.weight", w)], per_channel=True, writer=writer, every_n_steps=2)
    for _ in range(4):
        w.grad = torch.randn(4, 3)
        opt.step()
    tags = {t for t, _, _ in writer.calls}
    assert tags == {"effective_lr/conv.weight", "angular_update/conv.weight", "norm/conv.weight"}
    assert sorted({s for _, _, s in writer.calls}) == [2, 4]
    with pytest.raises(TypeError, match="add_scalar"):
        EffectiveLRMonitor(opt, [("w", w)], writer=object())


def test_detect_keeps_the_weights_whose_gradient_is_orthogonal():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6, bias=False), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = EffectiveLRMonitor(opt, [(n, p) for n, p in model.named_parameters() if p.dim() > 1], detect=True)
    nn.functional.cross_entropy(model(torch.randn(16, 5)), torch.randint(0, 3, (16,))).backward()
    opt.step()
    assert [n for n, _ in mon.named_params] == ["0.weight"]
    assert set(mon.latest()) >= {"effective_lr/0.weight", "angular_update/0.weight"}
    assert not any("3.weight" in k for k in mon.latest())


def test_bad_arguments():
    w = nn.Parameter(torch.ones(2, 2))
    opt = torch.optim.SGD([w], lr=0.1)
    with pytest.raises(ValueError, match="parameter 'x' is not in the optimizer"):
        EffectiveLRMonitor(opt, [("x", nn.Parameter(torch.ones(2)))])
    with pytest.raises(ValueError, match="every_n_steps must be >= 1, got 0"):
        EffectiveLRMonitor(opt, [("w", w)], every_n_steps=0)
    with pytest.raises(ValueError, match="got no parameters"):
        EffectiveLRMonitor(opt, [])


def test_many_layers_give_quantiles_and_an_aggregated_plot(tmp_path, monkeypatch):
    """Past max_layers: quantiles over layers instead of one entry per layer; 20+ layers plot as bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.figure

    ws = [nn.Parameter(torch.randn(4, 3)) for _ in range(21)]
    opt = torch.optim.SGD(ws, lr=0.1)
    mon = EffectiveLRMonitor(opt, [(f"layer{i}.weight", w) for i, w in enumerate(ws)])
    few_q = EffectiveLRMonitor(opt, [(f"layer{i}.weight", w) for i, w in enumerate(ws)], max_layers=4)
    for _ in range(4):
        for w in ws:
            w.grad = torch.randn(4, 3)
        opt.step()
    per_layer = [mon.latest()[f"effective_lr/layer{i}.weight"] for i in range(21)]
    q = few_q.latest()
    assert not any(k.startswith("effective_lr/layer") for k in q)
    assert q["effective_lr/median"] == pytest.approx(sorted(per_layer)[10])
    assert q["effective_lr/min"] == pytest.approx(min(per_layer)) and q["effective_lr/max"] == pytest.approx(
        max(per_layer))
    assert q["effective_lr/q25"] == pytest.approx(sorted(per_layer)[5])
    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a, **k: saved.append(self))
    for m in (mon, few_q):
        saved.clear()
        m.plot(tmp_path / "many.png")
        ax = saved[0].axes[0]
        assert len(ax.lines) == 1 and ax.lines[0].get_label() == "median layer"
        assert ax.get_legend_handles_labels()[1] == ["min–max of 21 layers", "25–75 % of layers", "median layer"]
    few = EffectiveLRMonitor(opt, [(f"layer{i}.weight", w) for i, w in enumerate(ws[:3])])
    opt.step()
    saved.clear()
    few.plot(tmp_path / "few.png")
    assert len(saved[0].axes[0].lines) == 3 and len(saved[0].legends) == 1
