"""SIGHUP (reload) is held, blocked, from process start until the server watches its
signals: one sent during start-up is then delivered instead of lost (ignoring it dropped
it; its default action would kill the process)."""

import signal
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import trio

# What a server process acts on: drain (TERM, INT), flush (USR1), reload (HUP).
SERVER_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP}


def hold_reloads() -> None:
    """Block SIGHUP in this thread (and the threads and processes it starts) until
    `server_signals` takes it."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})


@contextmanager
def server_signals() -> Iterator[AsyncIterator[int]]:
    """trio's receiver for SERVER_SIGNALS, with a SIGHUP held since start-up delivered."""
    with trio.open_signal_receiver(*SERVER_SIGNALS) as signals:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
        yield signals
