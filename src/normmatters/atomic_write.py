"""The one way this project writes a file: whole or not at all.

:func:`atomic_write` writes to a temporary file in the target's folder (``.<name>.<random>.tmp``), flushes and
fsyncs it, optionally verifies it, then ``os.replace`` s it over the target and fsyncs the folder. A reader
therefore sees the previous complete file or the new complete one, never a partial file; a failed, interrupted
or full-disk write (or one past the file-size limit, RLIMIT_FSIZE: the command line ignores SIGXFSZ so such a
write fails with EFBIG instead of killing the process) leaves the previous file untouched. A process killed
mid-write can leave its temporary file behind: :func:`remove_orphans` deletes them (the trainer calls it when a
run starts).

Symbolic links are never written through: when the target is a link, the link itself is replaced by the new
file (its destination is left as it was). :func:`atomic_open` collects a text file (a CSV) and writes it
whole, :func:`atomic_savefig` writes a matplotlib figure the same way, and
:func:`append_text` appends to a log-like file (``metrics.jsonl``) without following a link: it refuses one
with :class:`SymlinkError`.

No dependency beyond the standard library, so every layer of the package may use it.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

__all__ = ["atomic_write", "atomic_open", "atomic_savefig", "append_text", "DiskFullError", "SymlinkError",
           "remove_orphans"]

#: errno values that mean "no room left" (ENOSPC: device full, EDQUOT: quota, EFBIG: file-size limit)
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class DiskFullError(OSError):
    """Writing a file ran out of space (disk, quota or file-size limit); the previous file is intact."""


class SymlinkError(OSError):
    """A file to append to is a symbolic link; nothing was written through it."""


def _new_file_mode(path: Path) -> int:
    """The mode the written file gets: the replaced file's (not a link's), else 0o666 less the umask."""
    try:
        st = os.lstat(path)
        if not os.path.islink(path):
            return st.st_mode & 0o7777
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _full_error(e: OSError, path: Path, what: str) -> DiskFullError:
    return DiskFullError(
        e.errno,
        f"no space left while writing {path} ({os.strerror(e.errno or 0)}: the disk, a quota or the file-size "
        f"limit; {_free_space(path.parent)}): {what}; free some space (or raise the limit) and run again",
    )


def _free_space(folder: Path) -> str:
    try:
        return f"{shutil.disk_usage(folder).free / 2**20:.1f} MiB free"
    except OSError:  # pragma: no cover - the folder vanished
        return "free space unknown"


def _fsync_dir(folder: Path) -> None:
    try:  # make the rename itself durable
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # pragma: no cover - some filesystems cannot fsync a directory
        pass


def atomic_write(
    path: str | Path,
    content: bytes | str | Callable[[IO[bytes]], None],
    *,
    verify: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``content`` to ``path`` atomically; return ``path``.

    Args:
        path: the target file; its folder is created if missing.
        content: the bytes, the text (UTF-8), or a function that writes to the binary file object it is given.
        verify: called with the temporary file's path after it is written and synced, before it replaces
            ``path``; an exception from it aborts the write (the target is left as it was).

    Raises:
        DiskFullError: the disk, a quota or the file-size limit ran out (message says so and names ``path``).
        OSError: any other failure to write; the temporary file is removed either way.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(content, str):
                f.write(content.encode())
            elif isinstance(content, bytes | bytearray | memoryview):
                f.write(content)
            else:
                content(f)
            f.flush()
            os.fsync(f.fileno())
        if verify is not None:
            verify(tmp)
        os.chmod(tmp, _new_file_mode(path))
        os.replace(tmp, path)  # a link at ``path`` is replaced, not followed
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and not isinstance(e, DiskFullError) and e.errno in _FULL:
            raise _full_error(e, path, f"the previous {path.name} is intact") from e
        raise
    _fsync_dir(path.parent)
    return path


@contextmanager
def atomic_open(path: str | Path) -> Iterator[io.StringIO]:
    """``with atomic_open(path) as fh:`` — a text handle (``newline=""``, as the csv module wants) whose content
    is written to ``path`` by :func:`atomic_write` when the block ends without an exception (nothing is written
    otherwise)."""
    buf = io.StringIO(newline="")
    yield buf
    atomic_write(path, buf.getvalue())


def atomic_savefig(fig: object, path: str | Path, **kwargs: object) -> Path:
    """``fig.savefig`` (a matplotlib figure) into ``path`` through :func:`atomic_write`; the format is the
    suffix's (``.png``, ``.pdf``, ``.svg``) unless ``format=`` says otherwise."""
    path = Path(path)
    kwargs.setdefault("format", path.suffix.lstrip(".").lower() or "png")
    return atomic_write(path, lambda f: fig.savefig(f, **kwargs))  # type: ignore[attr-defined]


def append_text(path: str | Path, text: str) -> None:
    """Append ``text`` to ``path`` (created if missing) with one ``write``; never through a symbolic link.

    Raises:
        SymlinkError: ``path`` is a symbolic link (dangling or not); nothing was written.
        DiskFullError: no room left; at most a torn last line was added (readers skip it).
    """
    path = Path(path)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    if path.is_symlink():  # O_NOFOLLOW covers this too where it exists; the check gives the clearer message
        raise SymlinkError(errno.ELOOP, f"{path} is a symbolic link (to {os.readlink(path)}); refusing to write "
                           "through it: replace it with a regular file or remove it")
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise SymlinkError(e.errno, f"{path} is a symbolic link; refusing to write through it") from e
        raise
    try:
        data = text.encode()
        while data:
            n = os.write(fd, data)
            data = data[n:]
    except OSError as e:
        if e.errno in _FULL:
            raise _full_error(e, path, "its earlier lines are intact") from e
        raise
    finally:
        os.close(fd)


def remove_orphans(folder: str | Path, name: str) -> list[Path]:
    """Delete the temporary files :func:`atomic_write` left for ``folder/name`` when killed mid-write."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in folder.glob(f".{name}.*.tmp"):
        try:
            p.unlink()
            removed.append(p)
        except OSError:  # pragma: no cover - raced with another cleaner, or not ours to delete
            pass
    return removed
