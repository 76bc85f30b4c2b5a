"""Metrics files: one JSONL stream of every record plus a CSV per kind (``steps.csv``, ``epochs.csv``).

Records are dicts with a ``kind`` ("step" or "epoch") and a ``global_step``. On resume,
:meth:`MetricsWriter.truncate_after` drops records past the checkpoint's step so a run that died after its
last checkpoint does not log those steps twice.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

__all__ = ["MetricsWriter", "read_jsonl"]


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


class MetricsWriter:
    """Append records to ``metrics.jsonl`` and ``<kind>s.csv`` in ``folder``."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.folder / "metrics.jsonl"

    def _csv(self, kind: str) -> Path:
        return self.folder / f"{kind}s.csv"

    def write(self, record: dict[str, Any]) -> None:
        with self.jsonl.open("a") as f:
            f.write(json.dumps(record) + "\n")
        path = self._csv(record["kind"])
        fields = [k for k in record if k != "kind"]
        new = not path.exists()
        with path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(record)

    def truncate_after(self, global_step: int) -> None:
        """Drop every record whose ``global_step`` is past ``global_step``."""
        records = [r for r in read_jsonl(self.jsonl) if r.get("global_step", 0) <= global_step]
        for p in [self.jsonl, *self.folder.glob("*s.csv")]:
            if p.name in ("steps.csv", "epochs.csv", "metrics.jsonl"):
                p.unlink(missing_ok=True)
        for r in records:
            self.write(r)
