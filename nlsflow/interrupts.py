"""A stage's stop signals: the first SIGINT or SIGTERM raises StageStopped; later ones are ignored during cleanup.

    install_stop_handlers()            # at the start of a stage's main
    try:
        ...                            # the stage's work; an atomic folder removes itself on the way out
    except StageStopped as e:          # e.signum, e.signal_name
        ...                            # one line, exit code 128 + e.signum

A loop that must finish a step first (the training loop, which checkpoints) runs under `deferred_stop` instead.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_received: int | None = None  # the first stop signal this process got


class StageStopped(KeyboardInterrupt):
    """The stage was asked to stop (SIGINT or SIGTERM).

    A KeyboardInterrupt, so a library's `except Exception` does not swallow it.
    """

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.signal_name = signal.Signals(signum).name

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process stopped by a signal: 128 + its number."""
        return 128 + self.signum

    def __str__(self) -> str:
        return f"stopped by {self.signal_name}"


def _stop(signum: int, frame) -> None:
    """On the first stop signal: ignore both from now on (cleanup runs to its end) and raise StageStopped."""
    global _received
    if _received is not None:  # one that slipped in before SIG_IGN took effect
        return
    _received = signum
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    raise StageStopped(signum)


def install_stop_handlers() -> bool:
    """Make SIGINT and SIGTERM raise StageStopped in the main thread; False (nothing done) in any other thread."""
    if threading.current_thread() is not threading.main_thread():
        return False
    for sig in STOP_SIGNALS:
        signal.signal(sig, _stop)
    return True


@contextlib.contextmanager
def stop_handlers() -> Iterator[None]:
    """`install_stop_handlers` for the block, the previous handlers back afterwards (a stage's main run in-process)."""
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    install_stop_handlers()
    try:
        yield
    finally:
        if threading.current_thread() is threading.main_thread():
            for sig, handler in previous.items():
                signal.signal(sig, signal.SIG_DFL if handler is None else handler)


@dataclass
class StopFlag:
    signum: int | None = None  # the stop signal that arrived, if any


@contextlib.contextmanager
def deferred_stop(forward: Callable[[int], None] | None = None) -> Iterator[StopFlag]:
    """While the block runs, SIGINT/SIGTERM only set the flag (and go on to `forward`, e.g. a child process): a
    loop stops at its next safe point (the training loop checkpoints first), then raises StageStopped itself.
    The previous handlers are back afterwards."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def record(signum: int, frame) -> None:
        flag.signum = flag.signum or signum
        if forward is not None:
            with contextlib.suppress(Exception):  # the child may be gone; raising here would hit any line
                forward(signum)

    previous = {sig: signal.signal(sig, record) for sig in STOP_SIGNALS}
    try:
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


def stop_requested() -> int | None:
    """The stop signal this process has received (SIGINT or SIGTERM), or None while none has come."""
    return _received
