from __future__ import annotations

import io
import logging
import time

from normmatters import progress


def test_off_by_default_is_a_silent_stand_in(capsys):
    progress.enable(False)
    with progress.progress_bar(10, "x") as bar:
        bar.update(3)
        bar.set_postfix(a=1)
    assert bar.n == 3 and capsys.readouterr() == ("", "")
    with progress.elapsed_bar("y"):
        pass


def test_on_draws_and_log_lines_do_not_garble_the_bar(monkeypatch):
    import sys

    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    progress.enable(True)
    try:
        handler = logging.StreamHandler(sys.stderr)
        root = logging.getLogger()
        root.addHandler(handler)
        try:
            with progress.progress_bar(4, "steps", unit="step") as bar:
                for _ in range(4):
                    bar.update(1)
                    logging.getLogger("normmatters.test").warning("epoch line")
        finally:
            root.removeHandler(handler)
        with progress.elapsed_bar("bench", every_s=0.05):
            time.sleep(0.2)
    finally:
        progress.enable(False)
    text = err.getvalue()
    assert "steps" in text and "4/4" in text and text.count("epoch line") == 4
    # while the bar is open, records go through tqdm.write: each on a line of its own
    assert all(line.strip() == "epoch line" for line in text.replace("\r", "\n").splitlines() if "epoch" in line)
