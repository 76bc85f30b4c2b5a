from __future__ import annotations

import io
import sys

from normmatters import progress
from normmatters.report_constants import constants_rows


def test_rows_and_progress(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    progress.enable(True)
    try:
        rows = constants_rows([64, 1024], monte_carlo=False)
    finally:
        progress.enable(False)
    assert sorted({r["n"] for r in rows}) == [64, 1024] and len(rows) % 2 == 0
    for n in (64, 1024):  # with the exact constants every norm's E[σ̂]/σ is E[s_n]/σ, whatever the norm
        ratios = [r["sigma_ratio_ours"] for r in rows if r["n"] == n]
        assert max(ratios) - min(ratios) < 1e-6 and ratios[0] < 1
    assert "constants" in err.getvalue() and f"{len(rows)}/{len(rows)}" in err.getvalue()
