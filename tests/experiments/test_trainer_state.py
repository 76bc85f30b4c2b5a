"""The checkpoint side of the Trainer (normmatters.experiments.trainer_state): what a state holds, which config
changes a resume accepts, and the errors for the other cases."""

from __future__ import annotations

import pytest
import torch

from normmatters.experiments.checkpoint import CHECKPOINT_VERSION, REQUIRED_KEYS, CheckpointError
from normmatters.experiments.config import TrainConfig
from normmatters.experiments.trainer import Trainer
from normmatters.experiments.trainer_state import CHECKPOINT_NAME, RESUMABLE_CHANGES, TrainerState


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{**dict(model="resnet8", norm="l1", epochs=1, batch_size=64, lr=0.05, log_every=1), **kw})


def _one_step(trainer: Trainer) -> None:
    x, y = next(iter(trainer._batches(0, 0)))
    trainer._train_step(x, y)


def test_trainer_is_a_trainer_state_and_names_stay_importable():
    from normmatters.experiments import trainer as T

    assert issubclass(Trainer, TrainerState)
    assert (T.CHECKPOINT_NAME, T.RESUMABLE_CHANGES) == (CHECKPOINT_NAME, RESUMABLE_CHANGES)


def test_state_dict_holds_what_a_checkpoint_needs_and_restores_it(tiny, tmp_path):
    a = Trainer(_cfg(), tmp_path / "a", data=tiny)
    assert a.checkpoint_path == tmp_path / "a" / CHECKPOINT_NAME
    assert Trainer(_cfg(), None, data=tiny).checkpoint_path is None
    _one_step(a)
    state = a.state_dict()
    assert set(REQUIRED_KEYS) <= set(state) and state["version"] == CHECKPOINT_VERSION
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (0, 1, 1)
    assert len(state["rng"]) == 1 and state["world_size"] == 1
    b = Trainer(_cfg(epochs=3, log_every=2), None, data=tiny)  # resumable changes: accepted
    b.load_state_dict(state)
    assert (b.epoch, b.step_in_epoch, b.global_step) == (0, 1, 1)
    assert b._acc == a._acc and b._acc["count"] == 64
    for k, v in a.module.state_dict().items():
        assert torch.equal(b.module.state_dict()[k], v), k
    assert torch.equal(b.generator.get_state(), a.generator.get_state())


def test_config_change_outside_the_resumable_keys_is_refused(tiny):
    a = Trainer(_cfg(), None, data=tiny)
    state = a.state_dict()
    assert "lr" not in RESUMABLE_CHANGES
    with pytest.raises(CheckpointError, match=r"ck was written with a different config \(lr: 0\.05 → 0\.1\)"):
        Trainer(_cfg(lr=0.1), None, data=tiny).load_state_dict(state, source="ck")


def test_other_world_size_is_refused(tiny):
    state = Trainer(_cfg(), None, data=tiny).state_dict()
    state["world_size"] = 2
    with pytest.raises(CheckpointError, match=r"ck was written by 2 rank\(s\); this run has 1"):
        Trainer(_cfg(), None, data=tiny).load_state_dict(state, source="ck")


def test_mismatched_model_is_a_checkpoint_error(tiny):
    state = Trainer(_cfg(), None, data=tiny).state_dict()
    state["model"] = {"nope": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="ck does not match the model/optimizer of this config"):
        Trainer(_cfg(), None, data=tiny).load_state_dict(state, source="ck")


def test_save_and_resume_round_trip_and_resume_needs_a_path(tiny, tmp_path):
    a = Trainer(_cfg(), tmp_path / "run", data=tiny)
    _one_step(a)
    a.save()
    assert (tmp_path / "run" / CHECKPOINT_NAME).is_file()
    b = Trainer(_cfg(), tmp_path / "other", data=tiny)
    b.resume(tmp_path / "run" / CHECKPOINT_NAME)
    assert b.global_step == 1
    Trainer(_cfg(), None, data=tiny).save()  # no folder: nothing written, no error
    with pytest.raises(CheckpointError, match="resume needs a checkpoint path or an out_dir"):
        Trainer(_cfg(), None, data=tiny).resume()


def _bn_key(state: dict) -> str:
    return next(k for k in state["model"] if k.endswith("num_batches_tracked"))


_IMPOSSIBLE = [
    (lambda s: s.update(step_in_epoch=50, global_step=50), "step_in_epoch must be below the 3 steps of an epoch"),
    (lambda s: s.update(epoch=-5), "epoch must be an int ≥ 0, found -5"),
    (lambda s: s.update(global_step=7), r"global_step must be epoch × \d+ steps \+ step_in_epoch = 1"),
    (lambda s: s["rng"][0].update(numpy=None), r"rng\[0\]\.numpy must be present"),
    (lambda s: s["rng"].clear(), r"rng must be a list of 1 per-rank random states"),
    (lambda s: s["rng"][0]["python"].update(state=[1, 2]), r"rng\[0\]\.python\.state must be 625 ints"),
    (lambda s: s.update(history=[{"epoch": 1}]), r"history must be one record per finished epoch \(1\.\.0\)"),
    (lambda s: s["epoch_accumulators"].update(count=-1), "epoch_accumulators must be"),
    (lambda s: s["model"].update({_bn_key(s): torch.tensor(-3)}), r"model\..*num_batches_tracked must be an integer"),
    (lambda s: s["model"].update({_bn_key(s): torch.tensor(2.5)}), r"model\..*num_batches_tracked must be an integer"),
    (lambda s: s.update(config=None), "config must be a dict"),
]


def test_impossible_values_are_refused_by_name(tiny):
    """Values a run cannot have written (a crafted or damaged file with a valid digest) are refused before any
    of them is applied, naming the entry."""
    import copy

    a = Trainer(_cfg(), None, data=tiny)
    _one_step(a)
    good = a.state_dict()
    b = Trainer(_cfg(), None, data=tiny)
    for change, named in _IMPOSSIBLE:
        state = copy.deepcopy(good)
        change(state)
        with pytest.raises(CheckpointError, match=rf"ck: {named}.*left as it is"):
            b.load_state_dict(state, source="ck")
    b.load_state_dict(good, source="ck")  # nothing was applied before: the good state still loads
    assert (b.epoch, b.step_in_epoch, b.global_step) == (0, 1, 1)


def test_negative_optimizer_step_is_refused(tiny):
    a = Trainer(_cfg(optimizer="adam", lr=1e-3), None, data=tiny)
    _one_step(a)
    state = a.state_dict()
    first = next(iter(state["optimizer"]["state"]))
    state["optimizer"]["state"][first]["step"] = torch.tensor(-1.0)
    with pytest.raises(CheckpointError, match=rf"optimizer\.state\[{first}\]\.step must be a count ≥ 0"):
        Trainer(_cfg(optimizer="adam", lr=1e-3), None, data=tiny).load_state_dict(state, source="ck")
