"""Ctrl-C and SIGTERM in the flow process: passed on to the running stage, and kept from the embedded server.

A runner wraps a stage's process (or container) in `forward_stop_signals`: a stop signal is sent on to the stage,
which stops cleanly (nlsflow.interrupts), and the runner then fails with StageStoppedBySignal. The embedded Prefect
server is started with SIGINT blocked (`start_ephemeral_server_shielded`), so a terminal's Ctrl-C, which reaches
the whole process group, leaves it serving until the flow has recorded the stop; Prefect stops it at exit.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator

from nlsflow.interrupts import StopFlag, deferred_stop

_last_stop: int | None = None  # the signal that stopped a stage in this process, for the exit code


@contextlib.contextmanager
def forward_stop_signals(send: Callable[[int], None]) -> Iterator[StopFlag]:
    """While the block runs, SIGINT and SIGTERM are recorded and passed to `send` (the stage) instead of stopping
    this process (nlsflow.interrupts.deferred_stop); the signal is kept for main's exit code."""
    global _last_stop
    with deferred_stop(forward=send) as stop:
        try:
            yield stop
        finally:
            if stop.signum is not None:
                _last_stop = stop.signum


def stop_signal() -> int | None:
    """The signal that stopped a stage in this process (main's exit code is then 128 + it), or None."""
    return _last_stop


def start_ephemeral_server_shielded() -> None:
    """Start the Prefect server this process would start on first use, with SIGINT blocked in it.

    Only when Prefect would use its embedded server (no PREFECT_API_URL, ephemeral mode on): the same singleton,
    which Prefect then reuses and stops (SIGTERM) at exit. The child inherits the blocked mask, so Ctrl-C in a
    terminal does not reach it.
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    if server.running or threading.current_thread() is not threading.main_thread():
        return
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        server.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
