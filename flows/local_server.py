"""A private Prefect server with its UI, for a script or a test that needs a real one: `prefect server start` on a
free loopback port with a home of its own, stopped when the `with` block ends (`make ui` is the long-lived one)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from nlsflow.errors import NlsflowError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(ready, timeout: float, what: str):
    """Poll `ready()` every second until it returns something true (an HTTP error counts as not yet)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if result := ready():
                return result
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise NlsflowError(f"timed out after {timeout:.0f}s waiting for {what}")


@contextlib.contextmanager
def local_prefect_server(home: Path, log: Path, timeout: float = 180) -> Iterator[str]:
    """Start a server whose database lives in `home` and whose output goes to `log`; yield its API URL once it
    answers; stop it (and its process group) on exit."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_UI_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    env.pop("PREFECT_API_URL", None)
    with open(log, "w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:

        def healthy() -> bool:
            if server.poll() is not None:
                raise NlsflowError(f"the Prefect server exited with code {server.returncode}; see {log}")
            return httpx.get(f"{api}/health", timeout=5).status_code == 200

        wait_until(healthy, timeout, f"the Prefect server (log: {log})")
        yield api
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
