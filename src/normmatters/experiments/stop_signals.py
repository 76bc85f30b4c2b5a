"""Turn SIGINT / SIGTERM into a polite stop request while a run trains.

The first signal asks the run to finish its current step, save a checkpoint and return; a second one gives up
at once (``KeyboardInterrupt``; the last checkpoint on disk is intact because checkpoints are written
atomically). Handlers are installed only in the main thread and restored on exit.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["stop_on_signals"]

log = logging.getLogger(__name__)


@contextlib.contextmanager
def stop_on_signals(request_stop: Callable[[str], None], stopping: Callable[[], bool],
                    enabled: bool = True) -> Iterator[None]:
    """While inside, SIGINT/SIGTERM call ``request_stop(name)`` (or raise when ``stopping()`` already)."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if stopping():  # second signal: give up immediately
            raise KeyboardInterrupt(name)
        log.warning("%s received: finishing this step, saving a checkpoint and exiting", name)
        request_stop(name)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
