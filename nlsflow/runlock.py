"""One run at a time per run folder: an OS file lock (flock, through filelock) that dies with its holder.

The lock file `<run_dir>/.nlsflow.lock` is held for as long as a pipeline or a stage run alone works in the folder;
beside it `.nlsflow.lock.json` says who holds it (pid, host, start, command) so a second run can name the holder.
A pipeline's stages (subprocesses or containers sharing the folder through a volume) run under their parent's lock:
the parent's token, in NLSFLOW_RUN_LOCK, matches the holder file. The kernel drops the lock when the holder dies,
even by SIGKILL, so no lock is ever stale.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock, Timeout

from nlsflow.errors import NlsflowError
from nlsflow.io import atomic_write_text

LOCK_NAME = ".nlsflow.lock"
HOLDER_NAME = ".nlsflow.lock.json"
TOKEN_ENV = "NLSFLOW_RUN_LOCK"


class RunFolderReadOnly(NlsflowError):
    """The run folder cannot be written: a run may only read it (every stage up to date)."""


def holder(run_dir: Path) -> dict:
    """Who holds (or last held) the run folder's lock, from its holder file; {} when unknown."""
    try:
        record = json.loads((Path(run_dir) / HOLDER_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def describe(record: dict) -> str:
    if not record:
        return "another process (its holder file is missing)"
    return (
        f"pid {record.get('pid')} on host {record.get('host')} since {record.get('started')} ({record.get('command')})"
    )


def _writable(run_dir: Path) -> bool:
    return os.access(run_dir, os.W_OK | os.X_OK)


@contextlib.contextmanager
def run_lock(run_dir: Path, command: str) -> Iterator[None]:
    """Hold the run folder for this process (and the stages it starts); refuse with one line if another run does."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except PermissionError:
        raise RunFolderReadOnly(f"cannot create run folder {run_dir} (permission denied)") from None
    if not _writable(run_dir):
        raise RunFolderReadOnly(f"run folder {run_dir} is read-only")
    # flock only: a soft (marker-file) lock would outlive a killed holder
    lock = FileLock(run_dir / LOCK_NAME, mode=0o666, fallback_to_soft=False, preserve_lock_file=True)
    try:
        lock.acquire(timeout=0)
    except PermissionError:
        raise NlsflowError(
            f"cannot open {run_dir / LOCK_NAME} (permission denied); make it writable for this user (chmod g+w)"
        ) from None
    except Timeout:
        record = holder(run_dir)
        if not (record.get("token") and record.get("token") == os.environ.get(TOKEN_ENV)):
            raise NlsflowError(
                f"run folder {run_dir} is in use by {describe(record)}; wait for that run to end, or give another "
                "run_dir"
            ) from None
        lock = None  # our parent, the pipeline, holds it for us
    if lock is None:
        yield
        return
    previous = os.environ.get(TOKEN_ENV)
    token = uuid.uuid4().hex
    try:
        atomic_write_text(
            run_dir / HOLDER_NAME,
            json.dumps(
                {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "command": command or " ".join(sys.argv),
                    "token": token,
                }
            ),
        )
        os.environ[TOKEN_ENV] = token  # the stages this process starts inherit it
        yield
    finally:
        if previous is None:
            os.environ.pop(TOKEN_ENV, None)
        else:
            os.environ[TOKEN_ENV] = previous
        lock.release()


@contextlib.contextmanager
def hold_run_folder(run_dir: Path, command: str, pending: Callable[[], str | None]) -> Iterator[None]:
    """`run_lock`, except that a read-only run folder may still be read when nothing needs writing there:
    `pending()` says what would (e.g. "'train' needs to run (settings changed)"), or None."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(run_lock(run_dir, command))
        except RunFolderReadOnly as e:
            if (reason := pending()) is not None:
                raise NlsflowError(
                    f"{e}, and {reason}; make it writable, or copy the run (cp -a) and run the copy"
                ) from None
        yield
