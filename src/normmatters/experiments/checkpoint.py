"""Checkpoints that cannot run code and cannot be silently corrupt.

Format (version 3; the checksum header below is what is new since 2): ``torch.save`` of a dict holding only
tensors, numbers, strings, bools, None, lists, tuples
and dicts (the random-number states are stored as tensors and lists, see ``trainer._rng_state``), read back
with ``torch.load(weights_only=True)``. That unpickler builds tensors and plain containers only: a file that
names any other Python object (a crafted ``__reduce__``, or a version-1 checkpoint holding numpy/Python RNG
objects) is refused before anything in it runs. Chosen over safetensors + JSON because the optimizer and
scheduler state dicts are nested containers of tensors that ``torch.save`` already round-trips, and it needs no
new dependency.

Integrity (format 3): the file is a small header and the ``torch.save`` zip archive, the header holding the
SHA-256 of the archive: ``b"NMCKPT3\\n"`` (8 bytes), the digest (32 bytes), the archive. :func:`load_checkpoint`
checks the digest over every byte of the archive before ``torch.load`` sees any of it (the zip's own CRCs cover
only its members' data, not its central directory: a flipped bit in an entry's attributes or compression method
went unnoticed), so one flipped bit anywhere, header included, is refused with :class:`CheckpointError` and the
file is left as it is. :func:`save_checkpoint` checks the file it just wrote before it replaces the previous one
(:func:`normmatters.atomic_write.atomic_write`), so the last good checkpoint is never replaced by a bad one.
A plain ``torch.save`` archive (format 2, written by earlier versions) has no digest: it is refused with a message
saying so (its run cannot be resumed by this version; start it again in a new folder).

Values: the position counters (``epoch``, ``step_in_epoch``, ``global_step``) must be ints ≥ 0 and
``world_size`` an int ≥ 1 (:func:`load_checkpoint`); the trainer checks the rest of what it restores
(:mod:`normmatters.experiments.trainer_state`).
"""

from __future__ import annotations

import hashlib
import io
import pickle
import zipfile
from pathlib import Path
from typing import IO, Any

import torch

from ..atomic_write import atomic_write

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "verify_checkpoint_file",
           "CHECKPOINT_VERSION", "REQUIRED_KEYS", "MAGIC"]

CHECKPOINT_VERSION = 3
#: the first bytes of a checkpoint file; the SHA-256 of the archive follows, then the archive
MAGIC = b"NMCKPT3\n"
_DIGEST = hashlib.sha256().digest_size
REQUIRED_KEYS = (
    "version",
    "config",
    "epoch",
    "step_in_epoch",
    "global_step",
    "model",
    "optimizer",
    "scheduler",
    "rng",
    "world_size",
)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, unsafe or incomplete; the message names the file."""


def _archive(path: Path, data: bytes) -> bytes:
    """The zip archive inside a checkpoint file's bytes, after checking the header and the whole-file digest."""
    if not data.startswith(MAGIC):
        if data.startswith(b"PK\x03\x04"):
            raise CheckpointError(
                f"checkpoint {path} has no whole-file checksum: it is a plain torch.save archive (written by an "
                "older normmatters, format 2, or by something else), whose damage cannot all be detected; it was "
                "not loaded and is left as it is: start the run again in a new folder"
            )
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a checkpoint: it does not start with {MAGIC!r}; it was not loaded "
            "and is left as it is"
        )
    stored, archive = data[len(MAGIC):len(MAGIC) + _DIGEST], data[len(MAGIC) + _DIGEST:]
    if len(stored) != _DIGEST or hashlib.sha256(archive).digest() != stored:
        raise CheckpointError(
            f"checkpoint {path} is corrupt: it does not match the checksum (SHA-256 of the whole file) stored when "
            "it was written (a disk error, a partial copy or an edit); it was not loaded and is left as it is"
        )
    return archive


def verify_checkpoint_file(path: str | Path) -> None:
    """Raise :class:`CheckpointError` unless ``path`` holds a checkpoint whose whole-file SHA-256 matches and
    whose zip members match their CRC-32."""
    path = Path(path)
    _check_archive(path, _archive(path, _read(path)))


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({e.strerror or e})") from e


def _check_archive(path: Path, archive: bytes) -> None:
    try:
        with zipfile.ZipFile(io.BytesIO(archive)) as z:
            bad = z.testzip()
    except zipfile.BadZipFile as e:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a checkpoint: not a readable zip archive ({e}); "
            "it was not loaded and is left as it is"
        ) from e
    except (OSError, EOFError, ValueError, RuntimeError) as e:  # zlib/struct errors inside damaged members
        raise CheckpointError(
            f"checkpoint {path} is corrupt: {type(e).__name__}: {e}; it was not loaded and is left as it is"
        ) from e
    if bad is not None:
        raise CheckpointError(
            f"checkpoint {path} is corrupt: member {bad!r} does not match the checksum stored when it was "
            "written (a disk error, a partial copy or an edit); it was not loaded and is left as it is"
        )


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Atomically write ``state`` (``torch.save``) to ``path``, verified before it replaces the previous file.

    Raises :class:`~normmatters.atomic_write.DiskFullError` when the disk fills up (the previous file is intact).
    """
    def write(f: IO[bytes]) -> None:
        buf = io.BytesIO()
        torch.save(state, buf)
        archive = buf.getvalue()
        f.write(MAGIC + hashlib.sha256(archive).digest() + archive)

    atomic_write(path, write, verify=verify_checkpoint_file)


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Verify and read a checkpoint written by :func:`save_checkpoint`; nothing in the file can run code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    archive = _archive(path, _read(path))
    _check_archive(path, archive)
    try:
        state = torch.load(io.BytesIO(archive), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"checkpoint {path} refused: it holds Python objects other than tensors and plain containers, and "
            "loading it could run code. Either it was crafted, or it was written by an older normmatters "
            f"(checkpoint format 1, which stored random states as Python objects); resume is not possible "
            f"from it: start the run again in a new folder. (torch: {str(e).splitlines()[0]})"
        ) from e
    except Exception as e:  # noqa: BLE001 - any other failure to read means a corrupt file
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path}: expected a dict, found {type(state).__name__}")
    if state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"checkpoint {path}: format version {state.get('version')!r}, expected {CHECKPOINT_VERSION}; "
            "start the run again in a new folder"
        )
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {missing}")
    for key, lo in (("epoch", 0), ("step_in_epoch", 0), ("global_step", 0), ("world_size", 1)):
        v = state[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise CheckpointError(f"checkpoint {path}: {key} must be an int ≥ {lo}, found {v!r} "
                                  f"({type(v).__name__}); it was not loaded and is left as it is")
    return state
