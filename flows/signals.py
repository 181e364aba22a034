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
from dataclasses import dataclass

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_last_stop: int | None = None  # the signal that stopped a stage in this process, for the exit code


@dataclass
class StopRequest:
    """Which stop signal arrived while a stage ran (None if none)."""

    signum: int | None = None

    @property
    def signal_name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum else None


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def forward_stop_signals(send: Callable[[int], None]) -> Iterator[StopRequest]:
    """While the block runs, SIGINT and SIGTERM are recorded and passed to `send` (the stage) instead of stopping
    this process; the previous handlers (Prefect's SIGTERM bridge) are back afterwards. A no-op off the main thread."""
    stop = StopRequest()
    if not _in_main_thread():
        yield stop
        return

    def forward(signum: int, frame) -> None:
        global _last_stop
        stop.signum = stop.signum or signum
        _last_stop = stop.signum
        with contextlib.suppress(Exception):  # the stage may be gone already; raising here would hit any line
            send(signum)

    previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: set outside Python


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
    if server.running or not _in_main_thread():
        return
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        server.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
