from __future__ import annotations

import errno
import os

import pytest

from normmatters.atomic_write import DiskFullError, atomic_write, remove_orphans


def test_bytes_text_and_callback(tmp_path):
    p = tmp_path / "sub" / "f.txt"
    atomic_write(p, "héllo")
    assert p.read_text() == "héllo"
    atomic_write(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    atomic_write(p, lambda f: f.write(b"abc"))
    assert p.read_bytes() == b"abc"
    assert sorted(x.name for x in p.parent.iterdir()) == ["f.txt"]


def test_failed_verify_keeps_previous(tmp_path):
    p = tmp_path / "f"
    atomic_write(p, b"good")

    def reject(tmp):
        assert tmp.read_bytes() == b"bad" and tmp != p
        raise ValueError("rejected")

    with pytest.raises(ValueError, match="rejected"):
        atomic_write(p, b"bad", verify=reject)
    assert p.read_bytes() == b"good" and [x.name for x in tmp_path.iterdir()] == ["f"]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EFBIG])
def test_full_disk_message(tmp_path, code):
    p = tmp_path / "f"
    atomic_write(p, b"good")

    def full(f):
        f.write(b"half")
        raise OSError(code, os.strerror(code))

    with pytest.raises(DiskFullError, match=r"no space left while writing .*previous f is intact") as e:
        atomic_write(p, full)
    assert e.value.errno == code
    assert p.read_bytes() == b"good" and [x.name for x in tmp_path.iterdir()] == ["f"]


def test_other_errors_pass_through(tmp_path):
    def fail(f):
        raise OSError(errno.EIO, "io")

    with pytest.raises(OSError) as e:
        atomic_write(tmp_path / "f", fail)
    assert not isinstance(e.value, DiskFullError) and list(tmp_path.iterdir()) == []


def test_interrupt_removes_temp(tmp_path):
    def interrupted(f):
        f.write(b"x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "f", interrupted)
    assert list(tmp_path.iterdir()) == []


def test_remove_orphans(tmp_path):
    (tmp_path / ".checkpoint.pt.ab12.tmp").write_bytes(b"x")
    (tmp_path / ".checkpoint.pt.cd34.tmp").write_bytes(b"x")
    (tmp_path / ".other.ab12.tmp").write_bytes(b"x")
    (tmp_path / "checkpoint.pt").write_bytes(b"x")
    removed = remove_orphans(tmp_path, "checkpoint.pt")
    assert sorted(p.name for p in removed) == [".checkpoint.pt.ab12.tmp", ".checkpoint.pt.cd34.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.ab12.tmp", "checkpoint.pt"]
    assert remove_orphans(tmp_path / "missing", "x") == []
