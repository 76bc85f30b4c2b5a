from __future__ import annotations

import pytest
import torch

from normmatters.experiments import checkpoint as C


def _state(v: float) -> dict:
    s = {k: 0 for k in C.REQUIRED_KEYS}
    s.update(version=C.CHECKPOINT_VERSION, model={"w": torch.full((3,), v)})
    return s


def test_save_load_and_no_temp_left(tmp_path):
    p = tmp_path / "ck.pt"
    C.save_checkpoint(_state(1.0), p)
    C.save_checkpoint(_state(2.0), p)
    assert torch.equal(C.load_checkpoint(p)["model"]["w"], torch.full((3,), 2.0))
    assert [x.name for x in tmp_path.iterdir()] == ["ck.pt"]


def test_failed_save_keeps_last_good(tmp_path, monkeypatch):
    p = tmp_path / "ck.pt"
    C.save_checkpoint(_state(1.0), p)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(C.torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        C.save_checkpoint(_state(2.0), p)
    monkeypatch.undo()
    assert torch.equal(C.load_checkpoint(p)["model"]["w"], torch.full((3,), 1.0))
    assert [x.name for x in tmp_path.iterdir()] == ["ck.pt"]


def test_missing_corrupt_incomplete(tmp_path):
    with pytest.raises(C.CheckpointError, match="no checkpoint at .*nope.pt"):
        C.load_checkpoint(tmp_path / "nope.pt")
    p = tmp_path / "ck.pt"
    C.save_checkpoint(_state(1.0), p)
    p.write_bytes(p.read_bytes()[:50])
    with pytest.raises(C.CheckpointError, match="ck.pt is corrupt or unreadable"):
        C.load_checkpoint(p)
    torch.save({"version": 1, "model": {}}, p)
    with pytest.raises(C.CheckpointError, match="incomplete: missing \\['config'"):
        C.load_checkpoint(p)
