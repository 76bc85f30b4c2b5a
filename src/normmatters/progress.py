"""Progress bars for long loops, shown only when the command line turns them on.

The library never decides to draw on a terminal: the ``normmatters`` command calls :func:`enable` (when stderr
is a terminal), and loops wrap themselves in :func:`progress_bar`, which is a no-op object otherwise. While a
bar is open, log records go through tqdm (``tqdm.contrib.logging.logging_redirect_tqdm``) so a log line never
garbles the bar. tqdm is imported only when a bar is actually drawn.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

__all__ = ["enable", "enabled", "progress_bar", "elapsed_bar"]

_ON = {"value": False}


def enable(on: bool = True) -> None:
    """Turn progress bars on (the CLI does this when stderr is a terminal) or off."""
    _ON["value"] = bool(on)


def enabled() -> bool:
    return _ON["value"]


class _NoBar:
    """Stands in for a tqdm bar when bars are off: every call does nothing."""

    n = 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def set_description(self, *args: Any, **kwargs: Any) -> None:
        pass


@contextlib.contextmanager
def progress_bar(total: int | None, desc: str | None = None, unit: str = "it", leave: bool = True,
                 force: bool | None = None) -> Iterator[Any]:
    """A tqdm bar of ``total`` steps (or a no-op stand-in when bars are off); ``force`` overrides :func:`enabled`."""
    if not (enabled() if force is None else force):
        yield _NoBar()
        return
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm(), tqdm(total=total, desc=desc, unit=unit, leave=leave, dynamic_ncols=True) as bar:
        yield bar


@contextlib.contextmanager
def elapsed_bar(desc: str, every_s: float = 1.0) -> Iterator[None]:
    """For work whose length is unknown: a line that counts the seconds while it runs (nothing when bars are off)."""
    if not enabled():
        yield
        return
    stop = threading.Event()
    with progress_bar(None, desc, unit="s", leave=False) as bar:
        t0 = time.monotonic()

        def tick() -> None:
            while not stop.wait(every_s):
                bar.update(int(time.monotonic() - t0) - bar.n)

        thread = threading.Thread(target=tick, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
