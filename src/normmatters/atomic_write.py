"""The one way this project writes a file: whole or not at all.

:func:`atomic_write` writes to a temporary file in the target's folder (``.<name>.<random>.tmp``), flushes and
fsyncs it, optionally verifies it, then ``os.replace`` s it over the target and fsyncs the folder. A reader
therefore sees the previous complete file or the new complete one, never a partial file; a failed, interrupted
or full-disk write leaves the previous file untouched. A process killed mid-write can leave its temporary file
behind: :func:`remove_orphans` deletes them (the trainer calls it when a run starts).

No dependency beyond the standard library, so every layer of the package may use it.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

__all__ = ["atomic_write", "DiskFullError", "remove_orphans"]

#: errno values that mean "no room left" (ENOSPC: device full, EDQUOT: quota, EFBIG: file-size limit)
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class DiskFullError(OSError):
    """Writing a file ran out of space (disk, quota or file-size limit); the previous file is intact."""


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
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and not isinstance(e, DiskFullError) and e.errno in _FULL:
            raise DiskFullError(
                e.errno,
                f"no space left while writing {path} ({os.strerror(e.errno)}; {_free_space(path.parent)}): "
                f"the previous {path.name} is intact; free some space and run again",
            ) from e
        raise
    _fsync_dir(path.parent)
    return path


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
