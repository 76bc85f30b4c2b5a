import pytest
import torch

from normmatters.experiments.config import ConfigError, TrainConfig
from normmatters.experiments.metrics import read_jsonl
from normmatters.experiments.trainer import Trainer
from normmatters.optim import NormTrajectory


def _cfg(**kw):
    base = dict(model="resnet8", dataset="digits", norm="bn", epochs=2, batch_size=64, lr=0.05, momentum=0.9,
                weight_decay=0.0, wd_normalized=0.05, schedule="multistep", milestones=[1], seed=0,
                log_every=1, threads=1)
    return TrainConfig(**{**base, **kw})


def test_monitor_and_recorded_norms(tiny, tmp_path):
    t = Trainer(_cfg(record_norms="norms.npz"), tmp_path, data=tiny)
    t.fit()
    names = [n for n, _ in t.wd_tools.named]
    assert "conv1.weight" in names and not any(n.startswith("fc") for n in names)
    traj = NormTrajectory.load(tmp_path / "norms.npz")
    assert len(traj) == t.global_step == 6 and len(traj.shapes) == len(names)
    step = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["kind"] == "step"][-1]
    assert step["effective_lr/conv1.weight"] > 0 and step["angular_update/conv1.weight"] > 0
    assert step["angular_update/equilibrium"] > 0  # SGD with decay: the spherical-motion prediction beside it
    assert (tmp_path / "effective_lr.png").stat().st_size > 1000


def test_online_mimic_turns_decay_off_and_resumes_bit_identically(tiny, tmp_path):
    cfg = _cfg(mimic_weight_decay="online", record_norms="n.npz")
    straight = Trainer(cfg, tmp_path / "a", data=tiny)
    assert {g["name"]: g["weight_decay"] for g in straight.optimizer.param_groups}["normalized"] == 0.0
    straight.fit()
    first = Trainer(cfg, tmp_path / "b", data=tiny)
    first.fit(stop_after_epoch=1)
    second = Trainer(cfg, tmp_path / "b", data=tiny)
    second.fit(resume=True)
    for (n, a), b in zip(straight.module.state_dict().items(), second.module.state_dict().values()):
        assert torch.equal(a, b), n
    assert second.wd_tools.mimic.steps == straight.wd_tools.mimic.steps == 6
    for x, y in zip(second.wd_tools.mimic.rho, straight.wd_tools.mimic.rho):
        assert torch.equal(x, y)
    assert len(NormTrajectory.load(tmp_path / "b" / "n.npz")) == 6


def test_mimic_from_recorded_file(tiny, tmp_path):
    Trainer(_cfg(record_norms=str(tmp_path / "wd.npz")), tmp_path / "wd", data=tiny).fit()
    t = Trainer(_cfg(mimic_weight_decay=str(tmp_path / "wd.npz")), tmp_path / "m", data=tiny)
    t.fit()
    assert t.wd_tools.mimic.steps == 6


def test_norm_schedule_keeps_lr_and_scales_norms(tiny):
    t = Trainer(_cfg(norm_schedule=True, wd_normalized=0.0, gamma=0.25), None, data=tiny)
    w = dict(t.wd_tools.named)["conv1.weight"]
    norms = []
    t.on_step = lambda tr: norms.append(w.detach().norm().item())
    t.fit()
    assert {g["lr"] for g in t.optimizer.param_groups} == {0.05}
    # at the milestone (after step 3) the norm doubles (√(1/0.25)); elsewhere it moves by < 5 % a step
    assert norms[2] / norms[1] == pytest.approx(2.0, rel=0.05)
    assert all(abs(b / a - 1) < 0.05 for i, (a, b) in enumerate(zip(norms, norms[1:])) if i != 1)


def test_config_errors():
    with pytest.raises(ConfigError, match="norm_schedule replaces a step/multistep rate schedule"):
        _cfg(norm_schedule=True, schedule="cosine")
    with pytest.raises(ConfigError, match="'online' models SGD, got optimizer='adam'"):
        _cfg(mimic_weight_decay="online", optimizer="adam")
    with pytest.raises(ConfigError, match="mimic_rule='replay' \\(--wd-mimic replay\\) models AdamW too"):
        _cfg(mimic_weight_decay="online", optimizer="adamw")
    assert _cfg(mimic_weight_decay="online", optimizer="adamw", mimic_rule="replay").mimic_rule == "replay"
    with pytest.raises(ConfigError, match="mimic_rule must be one of"):
        _cfg(mimic_rule="scale")


def test_no_scale_invariant_weights(tiny):
    with pytest.raises(ValueError, match="has none"):
        Trainer(_cfg(norm="none", record_norms="x.npz"), None, data=tiny)
    assert Trainer(_cfg(norm="none"), None, data=tiny).wd_tools.monitor is None
