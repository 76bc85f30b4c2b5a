"""Two gloo CPU processes: identical weights on both ranks, a match with one process, and exact resume.

Tolerance: with no normalization (``norm="none"``) and no augmentation, 2 ranks × 32 samples average to
the same gradient as 1 process × 64 samples up to float summation order, so weights and losses must agree to
1e-5 after 6 SGD steps. With batch norm the ranks normalize over 32 samples each — ghost-batch statistics —
so only the across-rank and resume checks are exact there, unless the statistics are synced
(``sync_norm="lp"`` / ``"auto"``): then the two ranks again match one process on the full batch.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from normmatters.experiments import distributed as D
from normmatters.experiments.config import TrainConfig
from normmatters.experiments.data import ArrayDataset, DataSplit, load_digits
from normmatters.experiments.trainer import Trainer


def _tiny() -> DataSplit:
    d = load_digits()
    return DataSplit(
        "tiny",
        ArrayDataset(d.train.images[:192], d.train.labels[:192], d.train.classes),
        ArrayDataset(d.test.images[:64], d.test.labels[:64], d.test.classes),
    )


def _cfg(norm: str, **kw) -> TrainConfig:
    return TrainConfig(model="mlp", norm=norm, epochs=2, batch_size=64, lr=0.05, schedule="cosine", **kw)


def _worker(rank: int, world: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        info = D.current()
        data = _tiny()
        out = {}
        t = Trainer(_cfg("none"), None, data=data, dist_info=info)
        epochs = t.fit().epochs
        out["none"] = (t.module.state_dict(), epochs)
        for norm, sync in (("l1", "lp"), ("bn", "auto")):
            t = Trainer(_cfg(norm, sync_norm=sync), None, data=data, dist_info=info)
            epochs = t.fit().epochs
            norms = sorted({type(m).__name__ for m in t.module.modules() if "Norm" in type(m).__name__})
            out[f"{norm}_{sync}"] = (t.module.state_dict(), epochs, norms)
        t = Trainer(_cfg("bn", crop_padding=1, hflip=True), None, data=data, dist_info=info)
        t.fit()
        out["bn_straight"] = t.module.state_dict()
        Trainer(_cfg("bn", crop_padding=1, hflip=True), f"{tmp}/run", data=data, dist_info=info).fit(
            stop_after_epoch=1
        )
        t = Trainer(_cfg("bn", crop_padding=1, hflip=True), f"{tmp}/run", data=data, dist_info=info)
        t.fit(resume=True)
        out["bn_resumed"] = t.module.state_dict()
        torch.save(out, f"{tmp}/rank{rank}.pt")
        dist.barrier()  # both ranks done with their collectives before either tears the group down
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, str(tmp)), nprocs=2, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(2)], tmp


def test_ranks_hold_identical_weights(two_ranks):
    (r0, r1), _ = two_ranks
    for key in ("bn_straight", "bn_resumed"):
        for k in r0[key]:
            assert torch.equal(r0[key][k], r1[key][k]), (key, k)
    assert all(torch.equal(r0["none"][0][k], r1["none"][0][k]) for k in r0["none"][0])


def test_resume_across_ranks_is_bit_identical(two_ranks):
    (r0, _), tmp = two_ranks
    for k in r0["bn_straight"]:
        assert torch.equal(r0["bn_straight"][k], r0["bn_resumed"][k]), k
    assert (tmp / "run" / "checkpoint.pt").is_file()
    assert not (tmp / "run" / "rank1").exists()


def test_two_ranks_match_one_process(two_ranks):
    (r0, _), _ = two_ranks
    t = Trainer(_cfg("none"), None, data=_tiny())
    epochs = t.fit().epochs
    single = t.module.state_dict()
    ddp_weights, ddp_epochs = r0["none"]
    for k in single:
        torch.testing.assert_close(ddp_weights[k], single[k], atol=1e-5, rtol=1e-5)
    for a, b in zip(ddp_epochs, epochs, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
        assert a["test_loss"] == pytest.approx(b["test_loss"], abs=1e-5)
        assert a["test_acc"] == b["test_acc"]


@pytest.mark.parametrize("norm, sync", [("l1", "lp"), ("bn", "auto")])
def test_synced_norm_two_ranks_match_one_process(two_ranks, norm, sync):
    (r0, r1), _ = two_ranks
    t = Trainer(_cfg(norm), None, data=_tiny())
    epochs = t.fit().epochs
    single = t.module.state_dict()
    weights, sync_epochs, norms = r0[f"{norm}_{sync}"]
    assert norms == ["SyncLpBatchNorm1d"]  # "auto" on CPU: nn.BatchNorm1d becomes the same math, synced (l2)
    assert set(weights) == set(single)
    for k in single:
        torch.testing.assert_close(weights[k], single[k], atol=1e-5, rtol=1e-5)
        assert torch.equal(weights[k], r1[f"{norm}_{sync}"][0][k]), k
    for a, b in zip(sync_epochs, epochs, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
        assert a["test_loss"] == pytest.approx(b["test_loss"], abs=1e-5)


@pytest.mark.parametrize("device, stock", [("cuda", "SyncBatchNorm"), ("cpu", "SyncLpBatchNorm2d")])
def test_prepare_norm_layers_auto_syncs_every_norm(device, stock):
    import normmatters as nm

    model = torch.nn.Sequential(torch.nn.BatchNorm2d(3), nm.LpBatchNorm2d(3, norm="linf"))
    out = D.prepare_norm_layers(model, "auto", D.DistInfo(0, 2, 0), device=device)  # conversion only, no group
    assert [type(m).__name__ for m in out] == [stock, "SyncLpBatchNorm2d"] and out[1].norm == "linf"
    lp_only = D.prepare_norm_layers(torch.nn.Sequential(torch.nn.BatchNorm2d(3), nm.LpBatchNorm2d(3)), "lp",
                                    D.DistInfo(0, 2, 0))
    assert [type(m).__name__ for m in lp_only] == ["BatchNorm2d", "SyncLpBatchNorm2d"]
    with pytest.raises(ValueError, match="sync_norm must be"):
        D.prepare_norm_layers(model, "all", D.DistInfo(0, 2, 0))


def test_torchrun_environment_values_are_checked_by_name(monkeypatch):
    from normmatters.experiments import distributed as D

    monkeypatch.setenv("WORLD_SIZE", "abc")
    with pytest.raises(ValueError, match="environment variable WORLD_SIZE must be an int ≥ 1, got 'abc'"):
        D.init_from_env()
    monkeypatch.setenv("WORLD_SIZE", "0")
    with pytest.raises(ValueError, match="WORLD_SIZE must be an int ≥ 1, got '0'"):
        D.init_from_env()
    monkeypatch.setenv("WORLD_SIZE", "")
    assert D.env_int("WORLD_SIZE", 1, lo=1) == 1 and D.init_from_env() == D.current()
    monkeypatch.setenv("LOCAL_RANK", "-2")
    with pytest.raises(ValueError, match="LOCAL_RANK must be an int ≥ 0, got '-2'"):
        D.env_int("LOCAL_RANK", 0)
