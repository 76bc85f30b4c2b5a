from __future__ import annotations

import errno
import hashlib
import io
import os
import random
import re

import numpy as np
import pytest
import torch

from normmatters.atomic_write import DiskFullError
from normmatters.experiments import checkpoint as C


def _state(v: float) -> dict:
    s = {k: 0 for k in C.REQUIRED_KEYS}
    s.update(version=C.CHECKPOINT_VERSION, model={"w": torch.full((3,), v)}, world_size=1)
    return s


def _write_wrapped(obj, p) -> None:
    """``obj`` in a checkpoint container with a valid digest: only the checks after the digest stand in the way."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    p.write_bytes(C.MAGIC + hashlib.sha256(buf.getvalue()).digest() + buf.getvalue())


class _RunsCode:
    """A pickled object whose __reduce__ would create a marker file when unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


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
        raise OSError("write failed")

    monkeypatch.setattr(C.torch, "save", boom)
    with pytest.raises(OSError, match="write failed"):
        C.save_checkpoint(_state(2.0), p)
    monkeypatch.undo()
    assert torch.equal(C.load_checkpoint(p)["model"]["w"], torch.full((3,), 1.0))
    assert [x.name for x in tmp_path.iterdir()] == ["ck.pt"]


def test_full_disk_says_so_and_keeps_last_good(tmp_path, monkeypatch):
    p = tmp_path / "ck.pt"
    C.save_checkpoint(_state(1.0), p)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(C.torch, "save", full)
    with pytest.raises(DiskFullError, match=r"no space left while writing .*ck.pt.*previous ck.pt is intact"):
        C.save_checkpoint(_state(2.0), p)
    monkeypatch.undo()
    assert torch.equal(C.load_checkpoint(p)["model"]["w"], torch.full((3,), 1.0))
    assert [x.name for x in tmp_path.iterdir()] == ["ck.pt"]


def test_missing_truncated_incomplete(tmp_path):
    with pytest.raises(C.CheckpointError, match="no checkpoint at .*nope.pt"):
        C.load_checkpoint(tmp_path / "nope.pt")
    p = tmp_path / "ck.pt"
    C.save_checkpoint(_state(1.0), p)
    p.write_bytes(p.read_bytes()[:50])
    with pytest.raises(C.CheckpointError, match="ck.pt is corrupt"):
        C.load_checkpoint(p)
    _write_wrapped({"version": C.CHECKPOINT_VERSION, "model": {}}, p)
    with pytest.raises(C.CheckpointError, match="incomplete: missing \\['config'"):
        C.load_checkpoint(p)


@pytest.mark.parametrize("where", [0.5, 0.25, 0.75])
def test_bit_flip_is_refused_and_file_left(tmp_path, where):
    p = tmp_path / "ck.pt"
    state = _state(1.0)
    state["model"] = {"w": torch.randn(5000)}
    C.save_checkpoint(state, p)
    b = bytearray(p.read_bytes())
    i = int(len(b) * where)
    for j in range(i, i + 64):
        b[j] ^= 0xFF
    p.write_bytes(bytes(b))
    with pytest.raises(C.CheckpointError, match="ck.pt is corrupt"):
        C.load_checkpoint(p)
    assert p.read_bytes() == bytes(b)  # refused, not deleted or rewritten


def test_crafted_pickle_runs_no_code(tmp_path):
    p, marker = tmp_path / "ck.pt", tmp_path / "PWNED"
    state = _state(1.0)
    state["payload"] = _RunsCode(marker)
    _write_wrapped(state, p)  # a valid digest, a valid zip with valid CRCs: only the unpickler stands in the way
    with pytest.raises(C.CheckpointError, match="refused: it holds Python objects"):
        C.load_checkpoint(p)
    torch.save(state, p)  # a plain archive: refused before it is unpickled
    with pytest.raises(C.CheckpointError, match="no whole-file checksum"):
        C.load_checkpoint(p)
    assert not marker.exists()


def test_version_1_checkpoint_refused_with_a_clear_message(tmp_path):
    """Format 1 stored numpy / Python RNG states as objects; they cannot be loaded with weights_only=True."""
    p = tmp_path / "old.pt"
    state = _state(1.0)
    state.update(version=1, rng=[{"numpy": np.random.get_state(), "python": random.getstate()}])
    _write_wrapped(state, p)
    with pytest.raises(C.CheckpointError, match="older normmatters .*format 1.*start the run again"):
        C.load_checkpoint(p)
    state["rng"] = []
    _write_wrapped(state, p)
    with pytest.raises(C.CheckpointError, match="format version 1, expected 3"):
        C.load_checkpoint(p)


def test_format_2_plain_archive_refused_with_the_reason(tmp_path):
    p = tmp_path / "ck.pt"
    state = _state(1.0)
    state["version"] = 2
    torch.save(state, p)
    before = p.read_bytes()
    with pytest.raises(C.CheckpointError, match=r"no whole-file checksum: .*format 2.*left as it is"):
        C.load_checkpoint(p)
    assert p.read_bytes() == before


def _central_entries(data: bytes) -> list[int]:
    return [m.start() for m in re.finditer(rb"PK\x01\x02", data)]


@pytest.mark.parametrize("field", ["external attributes", "compression method", "header", "digest", "last byte"])
def test_one_flipped_bit_anywhere_is_refused(tmp_path, field):
    """The zip CRCs cover only the members' data: a flip in the central directory (an entry's attributes or
    compression method) or in the header must be caught by the whole-file digest."""
    p = tmp_path / "ck.pt"
    C.save_checkpoint(_state(1.0), p)
    b = bytearray(p.read_bytes())
    entries = _central_entries(bytes(b))
    at = {"external attributes": entries[0] + 38, "compression method": entries[len(entries) // 2] + 10,
          "header": 3, "digest": len(C.MAGIC) + 5, "last byte": len(b) - 1}[field]
    b[at] ^= 0x10
    p.write_bytes(bytes(b))
    with pytest.raises(C.CheckpointError, match="ck.pt is corrupt.*left as it is"):
        C.load_checkpoint(p)
    assert p.read_bytes() == bytes(b)


@pytest.mark.parametrize(("key", "value"), [("epoch", -5), ("global_step", 1.5), ("step_in_epoch", True),
                                            ("world_size", 0)])
def test_impossible_counters_refused_by_name(tmp_path, key, value):
    p = tmp_path / "ck.pt"
    state = _state(1.0)
    state[key] = value
    C.save_checkpoint(state, p)
    with pytest.raises(C.CheckpointError, match=rf"{key} must be an int ≥ [01], found {value!r}"):
        C.load_checkpoint(p)


def test_no_unsafe_loading_left_in_the_package():
    import pathlib

    import normmatters

    src = pathlib.Path(normmatters.__file__).parent
    text = "\n".join(p.read_text() for p in src.rglob("*.py"))
    assert "weights_only=False" not in text
    assert "pickle.load(" not in text and "pickle.loads(" not in text
    assert "allow_pickle=True" not in text
