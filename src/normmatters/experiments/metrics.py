"""Metrics files: one JSONL stream of every record plus a CSV per kind (``steps.csv``, ``epochs.csv``).

Records are dicts with a ``kind`` ("step" or "epoch") and a ``global_step``. During a run records are appended
(a kill mid-append can leave a torn last line, which :func:`read_jsonl` skips with a warning). On resume,
:meth:`MetricsWriter.truncate_after` drops records past the checkpoint's step so a run that died after its
last checkpoint does not log those steps twice; it rewrites every file atomically
(:func:`normmatters.atomic_write.atomic_write`), so a failure mid-rewrite leaves the old file whole.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from pathlib import Path
from typing import Any

from ..atomic_write import SymlinkError, append_text, atomic_write

__all__ = ["MetricsWriter", "read_jsonl", "MetricsFileError", "METRICS_FILES", "TENSORBOARD_DIR"]

log = logging.getLogger(__name__)

#: the files a :class:`MetricsWriter` owns in its folder
METRICS_FILES = ("metrics.jsonl", "steps.csv", "epochs.csv")


class MetricsFileError(ValueError):
    """A metrics file is damaged somewhere other than its last line; the message names file and line."""


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Every record of ``path`` ([] if missing). A torn last line (a kill mid-write) is skipped with a warning;
    a damaged line before it raises :class:`MetricsFileError`."""
    p = Path(path)
    if not p.is_file():
        return []
    lines = p.read_text(errors="replace").splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError(f"expected a JSON object, found {type(rec).__name__}")
        except ValueError as e:
            if all(not rest.strip() for rest in lines[i + 1 :]):
                log.warning("%s: skipping a torn last line %d (%d bytes; the run was killed while writing it)",
                            p, i + 1, len(line))
                break
            raise MetricsFileError(f"{p}: line {i + 1} is not a JSON record ({e})") from e
        records.append(rec)
    return records


def _csv_text(records: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    fields = [k for k in records[0] if k != "kind"]
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    w.writerows(records)
    return buf.getvalue()


#: the subfolder of a run folder that holds TensorBoard's event files
TENSORBOARD_DIR = "tensorboard"
#: record keys that are not metrics (never written to TensorBoard)
_NOT_SCALARS = ("kind", "global_step", "epoch")


class MetricsWriter:
    """Append records to ``metrics.jsonl`` and ``<kind>s.csv`` in ``folder``; with ``tensorboard=True`` also
    their numbers as TensorBoard scalars (tag = the record's key, step = its ``global_step``) in
    ``folder/tensorboard`` (needs the ``tensorboard`` package: ``pip install normmatters[tensorboard]``)."""

    def __init__(self, folder: str | Path, tensorboard: bool = False) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.folder / "metrics.jsonl"
        self.tensorboard = tensorboard
        self._tb: Any = None
        self._purge: int | None = None  # events from this step on, of an earlier run, are dropped

    def _summary_writer(self) -> Any:
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError(f"tensorboard=True needs the tensorboard package (pip install "
                                  f"normmatters[tensorboard]): {e}") from None
            events = self.folder / TENSORBOARD_DIR
            if events.is_symlink():  # event files stay inside the run folder, as every other file of a run
                raise SymlinkError(f"{events} is a symbolic link ({os.readlink(events)}); a run writes its "
                                   "TensorBoard events only inside its folder: remove the link and run again")
            self._tb = SummaryWriter(str(events), purge_step=self._purge)
        return self._tb

    def _write_scalars(self, record: dict[str, Any]) -> None:
        tb, step = self._summary_writer(), int(record.get("global_step", 0))
        for k, v in record.items():
            if k in _NOT_SCALARS or (k == "lr" and record.get("kind") == "epoch"):  # lr: the step records'
                continue
            if isinstance(v, int | float) and not isinstance(v, bool):
                tb.add_scalar(k, v, step)
        if record.get("kind") == "epoch":
            tb.flush()

    def flush(self) -> None:
        """Write TensorBoard's pending events to disk (the JSONL and CSV files are written as they come)."""
        if self._tb is not None:
            self._tb.flush()

    def _csv(self, kind: str) -> Path:
        return self.folder / f"{kind}s.csv"

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` to ``metrics.jsonl`` and its CSV, each with one write that follows no symbolic link
        (:func:`~normmatters.atomic_write.append_text`)."""
        append_text(self.jsonl, json.dumps(record) + "\n")
        path = self._csv(record["kind"])
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=[k for k in record if k != "kind"], extrasaction="ignore")
        if not path.exists() and not path.is_symlink():
            w.writeheader()
        w.writerow(record)
        append_text(path, buf.getvalue())
        if self.tensorboard:
            self._write_scalars(record)

    def truncate_after(self, global_step: int) -> int:
        """Keep only records whose ``global_step`` is at most ``global_step``; every file is rewritten atomically
        from ``metrics.jsonl`` (the CSVs are derived from it). Returns how many records were dropped."""
        if self.tensorboard:  # TensorBoard drops an earlier run's events from the next one's first step on
            self._purge = global_step + 1
        records = read_jsonl(self.jsonl)
        kept = [r for r in records if r.get("global_step", 0) <= global_step]
        kinds: dict[str, list[dict[str, Any]]] = {}
        for r in kept:
            kinds.setdefault(str(r.get("kind")), []).append(r)
        atomic_write(self.jsonl, "".join(json.dumps(r) + "\n" for r in kept))
        for name in METRICS_FILES[1:]:
            kind = name[: -len("s.csv")]
            if kind in kinds:
                atomic_write(self._csv(kind), _csv_text(kinds[kind]))
            else:
                self._csv(kind).unlink(missing_ok=True)
        return len(records) - len(kept)
