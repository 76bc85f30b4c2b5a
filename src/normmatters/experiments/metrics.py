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
from pathlib import Path
from typing import Any

from ..atomic_write import append_text, atomic_write

__all__ = ["MetricsWriter", "read_jsonl", "MetricsFileError", "METRICS_FILES"]

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


class MetricsWriter:
    """Append records to ``metrics.jsonl`` and ``<kind>s.csv`` in ``folder``."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.folder / "metrics.jsonl"

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

    def truncate_after(self, global_step: int) -> int:
        """Keep only records whose ``global_step`` is at most ``global_step``; every file is rewritten atomically
        from ``metrics.jsonl`` (the CSVs are derived from it). Returns how many records were dropped."""
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
