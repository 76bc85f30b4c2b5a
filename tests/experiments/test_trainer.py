"""Resume is bit-identical; stops save and exit; checkpoints are never clobbered; dtypes run."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from normmatters.experiments.checkpoint import CheckpointError
from normmatters.experiments.config import TrainConfig
from normmatters.experiments.metrics import read_jsonl
from normmatters.experiments.trainer import Trainer


def _cfg(**kw) -> TrainConfig:
    base = dict(
        model="resnet8",
        norm="l1",
        epochs=2,
        batch_size=64,
        lr=0.05,
        nesterov=True,
        crop_padding=1,
        hflip=True,
        warmup_epochs=0.5,
        log_every=1,
    )
    return TrainConfig(**{**base, **kw})


def _assert_same_weights(a: Trainer, b: Trainer) -> None:
    sa, sb = a.module.state_dict(), b.module.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    oa, ob = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    for i in oa:
        assert torch.equal(oa[i]["momentum_buffer"], ob[i]["momentum_buffer"])


def test_resume_after_epoch_is_bit_identical(tiny, tmp_path):
    straight = Trainer(_cfg(), tmp_path / "a", data=tiny)
    ra = straight.fit()
    first = Trainer(_cfg(), tmp_path / "b", data=tiny)
    assert first.fit(stop_after_epoch=1).status == "stopped"
    second = Trainer(_cfg(), tmp_path / "b", data=tiny)
    rb = second.fit(resume=True)
    assert rb.status == "finished" and second.global_step == straight.global_step == 6
    _assert_same_weights(straight, second)
    assert ra.epochs == rb.epochs  # history restored from the checkpoint, metrics identical
    # the metrics files hold each step exactly once
    steps = [r["global_step"] for r in read_jsonl(tmp_path / "b" / "metrics.jsonl") if r["kind"] == "step"]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_stop_mid_epoch_and_resume_is_bit_identical(tiny, tmp_path):
    straight = Trainer(_cfg(norm="bn"), None, data=tiny)
    straight.fit()

    def stop_at_4(t: Trainer) -> None:
        if t.global_step == 4:
            t.request_stop()

    first = Trainer(_cfg(norm="bn"), tmp_path, data=tiny, on_step=stop_at_4)
    r = first.fit()
    assert r.status == "stopped" and first.epoch == 1 and first.step_in_epoch == 1
    torch.manual_seed(1234)  # resume must restore the global RNG itself
    second = Trainer(_cfg(norm="bn"), tmp_path, data=tiny)
    second.fit(resume=True)
    _assert_same_weights(straight, second)
    assert second.history == straight.history


def test_sigint_saves_checkpoint_and_returns(tiny, tmp_path):
    def interrupt(t: Trainer) -> None:
        if t.global_step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    t = Trainer(_cfg(), tmp_path, data=tiny, on_step=interrupt)
    before = signal.getsignal(signal.SIGINT)
    r = t.fit(handle_signals=True)
    assert r.status == "SIGINT" and (tmp_path / "checkpoint.pt").is_file()
    assert signal.getsignal(signal.SIGINT) is before
    resumed = Trainer(_cfg(), tmp_path, data=tiny)
    resumed.resume()
    assert resumed.global_step == 2


def test_checkpoint_is_never_clobbered(tiny, tmp_path):
    Trainer(_cfg(epochs=1), tmp_path, data=tiny).fit()
    good = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(CheckpointError, match="already exists; resume it"):
        Trainer(_cfg(epochs=1), tmp_path, data=tiny).fit()
    with pytest.raises(CheckpointError, match=r"different config \(lr: 0.05 → 0.1\)"):
        Trainer(_cfg(epochs=2, lr=0.1), tmp_path, data=tiny).fit(resume=True)
    assert (tmp_path / "checkpoint.pt").read_bytes() == good
    (tmp_path / "checkpoint.pt").write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="checkpoint.pt is corrupt"):
        Trainer(_cfg(epochs=2), tmp_path, data=tiny).fit(resume=True)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        Trainer(_cfg(), tmp_path / "empty", data=tiny).fit(resume=True)


def test_outputs_written(tiny, tmp_path):
    Trainer(_cfg(epochs=1, log_every=2), tmp_path, data=tiny).fit()
    names = {p.name for p in tmp_path.iterdir()}
    assert {"config.yaml", "metrics.jsonl", "steps.csv", "epochs.csv", "checkpoint.pt"} <= names
    assert (tmp_path / "epochs.csv").read_text().splitlines()[0].startswith("global_step,epoch,train_loss")


@pytest.mark.parametrize("dtype", ["bf16", "autocast"])
def test_low_precision_runs(tiny, dtype):
    t = Trainer(_cfg(epochs=1, dtype=dtype, model="mlp"), None, data=tiny)
    r = t.fit()
    assert r.status == "finished" and torch.isfinite(torch.tensor(r.final["train_loss"]))
    if dtype == "bf16":
        assert next(t.module.parameters()).dtype == torch.bfloat16


def test_workers_give_the_same_run(tiny):
    a = Trainer(_cfg(epochs=1, model="mlp", workers=0), None, data=tiny)
    a.fit()
    b = Trainer(_cfg(epochs=1, model="mlp", workers=1), None, data=tiny)
    b.fit()
    _assert_same_weights(a, b)


def test_training_learns(digits):
    t = Trainer(_cfg(epochs=2, norm="linf", crop_padding=0, hflip=False, lr=0.1), None, data=digits)
    assert t.fit().final["test_acc"] > 0.9


# ------------------------------------------------------------------------------------------ faults


def _nan_data(tiny):
    from normmatters.experiments.data import ArrayDataset, DataSplit

    x = tiny.train.images.clone()
    x[: len(x) // 2] = float("nan")  # every batch of 64 of any order holds some
    return DataSplit("nan-digits", ArrayDataset(x, tiny.train.labels, tiny.train.classes), tiny.test)


@pytest.mark.parametrize("norm", ["bn", "l1"])  # bn: a NaN loss; l1: the layer's own non-finite check first
def test_nan_loss_stops_the_run(tiny, tmp_path, norm):
    from normmatters.experiments.trainer import DivergedError

    t = Trainer(_cfg(norm=norm, epochs=1, warmup_epochs=0.0, monitor=False), tmp_path, data=_nan_data(tiny))
    with pytest.raises(DivergedError, match=r"training diverged at epoch 1, step 1 \(global step 1\): .*"
                                            r"stopped without saving \(no checkpoint was saved\)"):
        t.fit()
    assert not (tmp_path / "checkpoint.pt").exists()


def test_resume_of_a_finished_run_says_complete(tiny, tmp_path):
    Trainer(_cfg(epochs=1), tmp_path, data=tiny).fit()
    before = (tmp_path / "checkpoint.pt").read_bytes()
    config = (tmp_path / "config.yaml").read_text()
    r = Trainer(_cfg(epochs=1), tmp_path, data=tiny).fit(resume=True)
    assert r.status == "complete" and r.step_times == [] and len(r.epochs) == 1
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    Trainer(_cfg(epochs=1, checkpoint_every=2), tmp_path, data=tiny).fit(resume=True)
    assert (tmp_path / "config.yaml").read_text() == config  # a complete run is left as it is


def test_longer_run_says_what_happens_to_the_schedule(tiny, tmp_path, caplog):
    Trainer(_cfg(epochs=1, warmup_epochs=0.0), tmp_path, data=tiny).fit()
    with caplog.at_level("WARNING"):
        t = Trainer(_cfg(epochs=2, warmup_epochs=0.0), tmp_path, data=tiny)
        t.fit(resume=True)
    assert "cosine schedule is recomputed for 2 epochs" in caplog.text
    assert "jumps from 0 (old schedule) to 0.025" in caplog.text
    assert [e["epoch"] for e in t.history] == [1, 2]


def test_fresh_run_after_a_kill_before_the_first_checkpoint(tiny, tmp_path):
    """Killed after logging epoch 1 but before its checkpoint: resume is impossible, a fresh run refuses to discard
    the earlier metrics (nothing is reset silently); once they are moved away it starts, listing each epoch once."""
    from normmatters.experiments.run_folder import OutputFolderError

    Trainer(_cfg(epochs=1), tmp_path, data=tiny).fit()
    (tmp_path / "checkpoint.pt").unlink()
    (tmp_path / ".checkpoint.pt.k1ll.tmp").write_bytes(b"half a checkpoint")
    with pytest.raises(CheckpointError, match="holds no checkpoint yet .* move its metrics files away"):
        Trainer(_cfg(epochs=1), tmp_path, data=tiny).fit(resume=True)
    before = (tmp_path / "metrics.jsonl").read_bytes()
    with pytest.raises(OutputFolderError, match="holds the metrics of an earlier run .* does not discard them"):
        Trainer(_cfg(epochs=2), tmp_path, data=tiny).fit()
    assert (tmp_path / "metrics.jsonl").read_bytes() == before
    kept = tmp_path / "earlier"
    kept.mkdir()
    for name in ("metrics.jsonl", "steps.csv", "epochs.csv"):
        (tmp_path / name).rename(kept / name)
    Trainer(_cfg(epochs=2), tmp_path, data=tiny).fit()
    epochs = [r["epoch"] for r in read_jsonl(tmp_path / "metrics.jsonl") if r["kind"] == "epoch"]
    assert epochs == [1, 2]
    assert (tmp_path / "epochs.csv").read_text().count("\n") == 3
    assert not list(tmp_path.glob(".*.tmp"))


def test_unknown_norm_option_is_a_config_error(tiny):
    from normmatters.experiments.config import ConfigError

    with pytest.raises(ConfigError, match=r"norm_options \{'kk': 5\} are not accepted by norm='bn'"):
        Trainer(_cfg(norm="bn", norm_options={"kk": 5}), data=tiny)


def test_step_time_waits_for_the_device_before_and_after(tiny, monkeypatch):
    """On CUDA the timed step starts once the augmentation's kernels are done and ends once the step's are."""
    trainer = Trainer(_cfg(epochs=1), None, data=tiny)
    log = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.append(("sync", device.type)))
    trainer.model.register_forward_pre_hook(lambda *a: log.append("forward"))
    trainer.optimizer.register_step_post_hook(lambda *a: log.append("step"))
    x, y = next(iter(trainer._batches(0, 0)))
    trainer._train_step(x, y)
    assert log == ["forward", "step"]  # the CPU: nothing to wait for
    log.clear()
    trainer.device = torch.device("cuda")  # only the synchronisation is looked at: the step itself stays on the CPU
    monkeypatch.setattr(trainer, "augment", lambda x, gen, train: x)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: self)
    trainer._train_step(x, y)
    assert log == [("sync", "cuda"), "forward", "step", ("sync", "cuda")]
    assert len(trainer.step_times) == 2
