from __future__ import annotations

import os
import signal
import threading

import pytest

from normmatters.experiments.stop_signals import stop_on_signals


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_first_signal_requests_a_stop_second_gives_up(sig):
    asked: list[str] = []
    before = signal.getsignal(sig)
    with stop_on_signals(asked.append, lambda: bool(asked)):
        os.kill(os.getpid(), sig)
        assert asked == [signal.Signals(sig).name]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), sig)
    assert signal.getsignal(sig) is before


def test_disabled_or_off_the_main_thread_installs_nothing():
    before = signal.getsignal(signal.SIGINT)
    with stop_on_signals(lambda n: None, lambda: False, enabled=False):
        assert signal.getsignal(signal.SIGINT) is before
    seen = []

    def other():
        with stop_on_signals(lambda n: None, lambda: False):
            seen.append(signal.getsignal(signal.SIGINT))

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert seen == [before]
