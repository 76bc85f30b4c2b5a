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
