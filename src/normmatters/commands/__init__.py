"""The sub-commands of ``normmatters``: each module has ``add_parser(subparsers)`` and ``run(args) -> int``.

Every command that writes files writes them under one predictable place unless ``--out`` says otherwise:
``runs/<command>-<date>-<time>/`` in the current folder (``runs/`` is git-ignored), see :func:`default_out`.
"""

from __future__ import annotations

import time
from pathlib import Path

#: the folder, relative to the current one, that holds every command's default output folder
RUNS_DIR = Path("runs")


def default_out(name: str) -> Path:
    """``runs/<name>-<YYYYmmdd-HHMMSS>``: the output folder of a command run without ``--out``."""
    return RUNS_DIR / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
