"""Atomic checkpoints: write to a temporary file in the same folder, fsync, ``os.replace``, fsync the folder.

A reader therefore sees either the previous complete checkpoint or the new complete one, never a partial
file; a failed or interrupted save leaves the last good checkpoint untouched. Loading reports a missing or
unreadable file as :class:`CheckpointError` naming the path.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "CHECKPOINT_VERSION", "REQUIRED_KEYS"]

CHECKPOINT_VERSION = 1
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
    """A checkpoint is missing, unreadable or incomplete; the message names the file."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Atomically write ``state`` (``torch.save``) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # pragma: no cover - some filesystems cannot fsync a directory
        pass


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Read and sanity-check a checkpoint written by :func:`save_checkpoint`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        # weights_only=False: the state holds numpy / python RNG states; only load checkpoints you wrote.
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - any failure to unpickle means a corrupt file
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path}: expected a dict, found {type(state).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {missing}")
    if state["version"] != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"checkpoint {path}: format version {state['version']}, expected {CHECKPOINT_VERSION}"
        )
    return state
