"""The output folder of one training run: checked before anything is trained, tidied when a run starts.

A run folder holds ``config.yaml``, ``metrics.jsonl``, ``steps.csv``, ``epochs.csv`` and ``checkpoint.pt``
(:mod:`normmatters.experiments.trainer`). Before a run: the folder must be a folder we can write to
(:func:`check_output_folder`, a clear :class:`OutputFolderError` instead of a traceback from deep inside the
run), and none of the files a run writes may be a symbolic link (a run writes only inside its folder, never
through a link to elsewhere). When a run starts: temporary files a killed write left behind are deleted, and a
fresh run refuses a folder holding the metrics of an earlier run (it never discards results: resume that run,
or move its files away, or choose another folder) (:func:`tidy_run_folder`).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from ..atomic_write import remove_orphans
from .metrics import METRICS_FILES, MetricsWriter

__all__ = ["OutputFolderError", "check_output_folder", "tidy_run_folder", "RUN_FILES", "RUN_PLOTS"]

log = logging.getLogger(__name__)

#: every file a run writes into its folder (the checkpoint's name is the trainer's ``CHECKPOINT_NAME``)
RUN_FILES = ("checkpoint.pt", "config.yaml", *METRICS_FILES)
#: the plots a run draws into its folder (replaced, never appended to)
RUN_PLOTS = ("curves.png", "effective_lr.png")


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
    links = [name for name in (*RUN_FILES, *RUN_PLOTS) if (out / name).is_symlink()]
    if links:
        raise OutputFolderError(
            f"output folder {out}: {', '.join(links)} {'is a symbolic link' if len(links) == 1 else 'are links'}"
            f" ({'; '.join(f'{n} → {os.readlink(out / n)}' for n in links)}); a run writes only regular files "
            "inside its folder: replace the link(s) by the file(s) or remove them, and run again"
        )
    return out


def tidy_run_folder(out: str | Path, fresh: bool, writer: MetricsWriter | None) -> None:
    """Delete temporary files a killed run left; a ``fresh`` run refuses a folder that holds earlier metrics
    (:class:`OutputFolderError`: they are kept, as a folder holding a checkpoint is)."""
    out = Path(out)
    removed = [p for name in RUN_FILES for p in remove_orphans(out, name)]
    if removed:
        log.warning("removed %d temporary file(s) a killed run left in %s: %s", len(removed), out,
                    ", ".join(p.name for p in removed))
    if fresh and any((out / name).exists() for name in METRICS_FILES):
        found = [name for name in METRICS_FILES if (out / name).exists()]
        raise OutputFolderError(
            f"output folder {out} holds the metrics of an earlier run ({', '.join(found)}) but no checkpoint "
            "to resume it from; a fresh run does not discard them: move them away (or delete them) to start "
            "over, or choose another output folder"
        )
