from __future__ import annotations

import errno
import os

import pytest

from normmatters.atomic_write import (
    DiskFullError,
    SymlinkError,
    append_text,
    atomic_open,
    atomic_savefig,
    atomic_write,
    remove_orphans,
)


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


def test_a_symlink_target_is_replaced_not_followed(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    link = tmp_path / "run" / "report.md"
    link.parent.mkdir()
    link.symlink_to(outside)
    atomic_write(link, "new")
    assert outside.read_text() == "keep me" and not link.is_symlink() and link.read_text() == "new"
    dangling = tmp_path / "run" / "plot.png"
    dangling.symlink_to(tmp_path / "never-created")
    atomic_write(dangling, b"png")
    assert not (tmp_path / "never-created").exists() and dangling.read_bytes() == b"png"


def test_written_file_gets_the_usual_mode_or_keeps_the_old_one(tmp_path):
    p = tmp_path / "f"
    mask = os.umask(0o022)
    os.umask(mask)
    atomic_write(p, b"x")
    assert p.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0600
    p.chmod(0o640)
    atomic_write(p, b"y")
    assert p.stat().st_mode & 0o777 == 0o640


def test_atomic_open_writes_whole_or_nothing(tmp_path):
    import csv

    p = tmp_path / "t.csv"
    with atomic_open(p) as fh:
        csv.writer(fh).writerow(["a", "b"])
        assert not p.exists()  # nothing on disk until the block ends
    assert p.read_bytes() == b"a,b\r\n"
    with pytest.raises(RuntimeError), atomic_open(p) as fh:
        fh.write("half")
        raise RuntimeError("failed mid-table")
    assert p.read_bytes() == b"a,b\r\n" and [x.name for x in tmp_path.iterdir()] == ["t.csv"]


def test_atomic_savefig_through_a_failing_figure_keeps_the_old_plot(tmp_path):
    class Fig:
        def __init__(self, fail):
            self.fail, self.seen = fail, {}

        def savefig(self, f, **kw):
            self.seen = kw
            f.write(b"PNG...")
            if self.fail:
                raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))

    p = tmp_path / "curves.png"
    fig = Fig(False)
    atomic_savefig(fig, p, dpi=110)
    assert p.read_bytes() == b"PNG..." and fig.seen == {"dpi": 110, "format": "png"}
    with pytest.raises(DiskFullError, match=r"curves.png .*file-size limit.*previous curves.png is intact"):
        atomic_savefig(Fig(True), p)
    assert p.read_bytes() == b"PNG..." and [x.name for x in tmp_path.iterdir()] == ["curves.png"]


def test_append_text_never_follows_a_link(tmp_path):
    p = tmp_path / "metrics.jsonl"
    append_text(p, "a\n")
    append_text(p, "b\n")
    assert p.read_text() == "a\nb\n"
    outside = tmp_path / "outside"
    outside.write_text("keep me")
    for target in (outside, tmp_path / "never-created"):
        link = tmp_path / "link.jsonl"
        link.unlink(missing_ok=True)
        link.symlink_to(target)
        with pytest.raises(SymlinkError, match=r"link.jsonl is a symbolic link .*refusing to write through it"):
            append_text(link, "x\n")
    assert outside.read_text() == "keep me" and not (tmp_path / "never-created").exists()


def test_file_size_limit_leaves_the_previous_file(tmp_path):
    """A rerun under RLIMIT_FSIZE (in a child: the limit is per process): EFBIG, not SIGXFSZ, and the old file
    is intact."""
    import subprocess
    import sys
    import textwrap

    p = tmp_path / "table.csv"
    p.write_bytes(b"old,table\n" * 10)
    code = textwrap.dedent(f"""
        import resource, signal, sys
        from normmatters.atomic_write import DiskFullError, atomic_write
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # what the command line does
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))
        try:
            atomic_write({str(p)!r}, b"x" * 4096)
        except DiskFullError as e:
            print(e)
            sys.exit(3)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 3 and "File too large" in r.stdout and "previous table.csv is intact" in r.stdout, r
    assert p.read_bytes() == b"old,table\n" * 10 and [x.name for x in tmp_path.iterdir()] == ["table.csv"]
