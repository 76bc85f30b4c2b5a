import pytest
import torch
from torch import nn

from normmatters.optim import (
    ChannelStepLog,
    NormTrajectory,
    WeightDecayMimic,
    angular_update_ratio,
    effective_step_ratio,
)

N, T, LR, LAM = 128, 60, 0.02, 0.2
X = torch.randn(N, 3, 6, 6, generator=torch.Generator().manual_seed(0))
Y = (X.flatten(1) @ torch.randn(108, 4, generator=torch.Generator().manual_seed(1))).argmax(1)
BATCHES = [torch.randint(0, N, (32,), generator=torch.Generator().manual_seed(i)) for i in range(T)]


def _net():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 4))


def _run(mode, every=1, traj=None, lr=LR):
    net = _net().train()
    si = [net[0].weight, net[3].weight]
    rest = [p for p in net.parameters() if all(p is not q for q in si)]
    opt = torch.optim.SGD([{"params": si, "weight_decay": LAM if mode == "wd" else 0.0}, {"params": rest}],
                          lr=lr, momentum=0.9)
    rec = NormTrajectory()
    opt.register_step_pre_hook(lambda *_: rec.append(si))
    mimic = None
    if mode == "ref":
        mimic = WeightDecayMimic(opt, si, reference=traj).attach()
    elif mode == "online":
        mimic = WeightDecayMimic(opt, si, weight_decay=LAM).attach()
    log = ChannelStepLog(opt, si, factors=(lambda: mimic.last_factors) if mimic else None, every=every)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=T // 2, gamma=0.1)
    for idx in BATCHES:
        loss = nn.functional.cross_entropy(net(X[idx]), Y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return log, rec, si


def test_log_records_norms_rates_and_angles():
    log, rec, si = _run("wd")
    assert log.steps == list(range(T)) and log.norms().shape == (T, 11)
    # the norms before each step are the trajectory's; the rate follows the scheduler
    for k in (0, T // 2, T - 1):
        torch.testing.assert_close(log.norms()[k], torch.cat(rec.norms(k)))
    eff = log.effective_steps()
    torch.testing.assert_close(eff[0], LR / torch.cat(rec.norms(0)) ** 2)
    torch.testing.assert_close(eff[T - 1], 0.1 * LR / torch.cat(rec.norms(T - 1)) ** 2)
    # angles: the last step's, checked against the final weights and the trajectory's step before
    assert (log.angles() > 0).all() and (log.angles() < 0.5).all()


def test_every_logs_a_subset():
    log, _, _ = _run("wd", every=7)
    assert log.steps == list(range(0, T, 7))


def test_effective_step_ratio_tells_decay_from_no_decay():
    wd, traj, _ = _run("wd")
    none, _, _ = _run("none")
    ref, _, _ = _run("ref", traj=traj)
    online, _, _ = _run("online")
    same = effective_step_ratio(wd, wd)
    assert same == {"median": 1.0, "iqr": 0.0}
    # the mimic from the recorded norms applies exactly the decay run's effective step (its factor counted)
    r = effective_step_ratio(ref, wd)
    assert r["median"] == pytest.approx(1.0, abs=1e-6) and r["iqr"] < 1e-6
    # no decay: the decay run's norms shrink, so its effective step grows past the no-decay run's
    n = effective_step_ratio(none, wd)
    assert n["median"] < 0.8 and n["iqr"] > 0.05
    last = none.effective_steps()[-1] / wd.effective_steps()[-1]
    first = none.effective_steps()[0] / wd.effective_steps()[0]
    assert (last < first).all() and torch.equal(first, torch.ones_like(first))
    # online: ρ predicted, not read; close to 1, far closer than no decay
    o = effective_step_ratio(online, wd)
    assert abs(o["median"] - 1) < 0.05 and o["iqr"] < n["iqr"]


def test_a_faster_rate_shows_in_the_ratio():
    # the ratio measures what it should: a run with 1.5x the rate (same norms at step 0) starts at 1.5
    wd, _, _ = _run("wd")
    fast, _, _ = _run("wd", lr=1.5 * LR)
    r = fast.effective_steps()[0] / wd.effective_steps()[0]
    torch.testing.assert_close(r, torch.full_like(r, 1.5))
    assert effective_step_ratio(fast, wd)["median"] != pytest.approx(1.0, abs=0.01)


def test_errors():
    p = nn.Parameter(torch.randn(3, 4))
    q = nn.Parameter(torch.randn(3, 4))
    opt = torch.optim.SGD([p], lr=0.1)
    with pytest.raises(ValueError, match="parameter 0 is not in the optimizer"):
        ChannelStepLog(opt, [q])
    with pytest.raises(ValueError, match="every must be >= 1"):
        ChannelStepLog(opt, [p], every=0)
    log = ChannelStepLog(opt, [p])
    with pytest.raises(ValueError, match="no step recorded yet"):
        log.norms()
    adam_log = ChannelStepLog(torch.optim.Adam([p]), [p])
    with pytest.raises(ValueError, match="differ in kind"):
        effective_step_ratio(log, adam_log)


def _turns(lr, steps=6):
    """A plain SGD run (no momentum) of one 5-channel weight on fixed gradients, logged."""
    w = nn.Parameter(torch.randn(5, 4, generator=torch.Generator().manual_seed(0)))
    opt = torch.optim.SGD([w], lr=lr)
    log = ChannelStepLog(opt, [w])
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        w.grad = torch.randn(5, 4, generator=g)
        opt.step()
    return log


def test_angular_update_ratio_measures_what_the_runs_did():
    ref = _turns(1e-3)
    assert angular_update_ratio(ref, ref) == {"median": 1.0, "iqr": 0.0}
    # half the rate turns half as far at the first step (small steps: the angle is about η‖g_⊥‖/‖w‖)
    first = angular_update_ratio(_turns(5e-4), ref, 0, 1)
    assert first["median"] == pytest.approx(0.5, rel=1e-3) and first["iqr"] < 1e-3
    fast = angular_update_ratio(_turns(2e-3), ref, 3)  # the window [3, end)
    assert fast["median"] == pytest.approx(2.0, rel=1e-2)
    assert angular_update_ratio(ref, ref, 10)["median"] != angular_update_ratio(ref, ref, 10)["median"]  # NaN
