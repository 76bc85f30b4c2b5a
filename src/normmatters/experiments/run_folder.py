"""The output folder of one training run: checked before anything is trained, tidied when a run starts.

A run folder holds ``config.yaml``, ``metrics.jsonl``, ``steps.csv``, ``epochs.csv`` and ``checkpoint.pt``
(:mod:`normmatters.experiments.trainer`). Before a run: the folder must be a folder we can write to
(:func:`check_output_folder`, a clear :class:`OutputFolderError` instead of a traceback from deep inside the
run). When a run starts: temporary files a killed write left behind are deleted, and a fresh run discards the
metrics of an earlier run that was killed before its first checkpoint, so no epoch is listed twice
(:func:`tidy_run_folder`).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from ..atomic_write import remove_orphans
from .metrics import METRICS_FILES, MetricsWriter

__all__ = ["OutputFolderError", "check_output_folder", "tidy_run_folder", "RUN_FILES"]

log = logging.getLogger(__name__)

#: every file a run writes into its folder (the checkpoint's name is the trainer's ``CHECKPOINT_NAME``)
RUN_FILES = ("checkpoint.pt", "config.yaml", *METRICS_FILES)


class OutputFolderError(ValueError):
    """The output folder is a file, cannot be created, or cannot be written to."""


def check_output_folder(out: str | Path) -> Path:
    """Create ``out`` if needed and prove we can write into it; raise :class:`OutputFolderError` otherwise."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"output folder {out} is a file; expected a folder (or a path that does not exist)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise OutputFolderError(f"cannot write to output folder {out}: {e.strerror or e}") from e
    return out


def tidy_run_folder(out: str | Path, fresh: bool, writer: MetricsWriter | None) -> None:
    """Delete temporary files a killed run left; for a ``fresh`` run, drop earlier metrics (there is no
    checkpoint they could belong to: a fresh run refuses a folder that has one)."""
    out = Path(out)
    removed = [p for name in RUN_FILES for p in remove_orphans(out, name)]
    if removed:
        log.warning("removed %d temporary file(s) a killed run left in %s: %s", len(removed), out,
                    ", ".join(p.name for p in removed))
    if fresh and writer is not None and any((out / name).exists() for name in METRICS_FILES):
        dropped = writer.truncate_after(-1)
        log.warning("%s held %d metric record(s) of an earlier run that stopped before its first checkpoint; "
                    "they are discarded and the run starts over", out, dropped)
