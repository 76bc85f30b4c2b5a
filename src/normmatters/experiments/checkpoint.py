"""Checkpoints that cannot run code and cannot be silently corrupt.

Format (version 2): ``torch.save`` of a dict holding only tensors, numbers, strings, bools, None, lists, tuples
and dicts (the random-number states are stored as tensors and lists, see ``trainer._rng_state``), read back
with ``torch.load(weights_only=True)``. That unpickler builds tensors and plain containers only: a file that
names any other Python object (a crafted ``__reduce__``, or a version-1 checkpoint holding numpy/Python RNG
objects) is refused before anything in it runs. Chosen over safetensors + JSON because the optimizer and
scheduler state dicts are nested containers of tensors that ``torch.save`` already round-trips, and it needs no
new dependency.

Integrity: ``torch.save`` writes a zip archive with a CRC-32 per member, which ``torch.load`` does not check.
:func:`load_checkpoint` checks every member's CRC first and refuses a file whose bytes changed after it was
written (a bit flip, a partial copy); :func:`save_checkpoint` checks the file it just wrote before it replaces
the previous one (:func:`normmatters.atomic_write.atomic_write`), so the last good checkpoint is never replaced
by a bad one, and a refused file is left in place untouched.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..atomic_write import atomic_write

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "verify_checkpoint_file",
           "CHECKPOINT_VERSION", "REQUIRED_KEYS"]

CHECKPOINT_VERSION = 2
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


def verify_checkpoint_file(path: str | Path) -> None:
    """Raise :class:`CheckpointError` unless ``path`` is a zip archive whose every member matches its CRC-32."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
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
    atomic_write(path, lambda f: torch.save(state, f), verify=verify_checkpoint_file)


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Verify and read a checkpoint written by :func:`save_checkpoint`; nothing in the file can run code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    verify_checkpoint_file(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
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
    return state
