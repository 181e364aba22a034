"""The docs' picture of a run in the Prefect UI, made again from nothing: `make docs-screenshot`.

A Prefect server with its UI starts on a free loopback port with a home of its own; the tiny math pipeline runs
against it (a few minutes on a CPU); headless Chromium photographs the finished flow run's page; the server stops.
Needs a Chromium (`apt-get install chromium`, or CHROMIUM=/path/to/chrome).

    python docs/gen/prefect_screenshot.py [--out docs/images/prefect-flow-run.png] [key=value ...]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
LIGHT = ["train.max_steps=40", "search.num_evals=6", "evaluate.baselines=[pruned]"]  # a quick run, every panel


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(ready, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if result := ready():
                return result
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"error: timed out after {timeout:.0f}s waiting for {what}")


def chromium() -> str:
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and (path := shutil.which(name)):
            return path
    raise SystemExit("error: no Chromium found; install one (apt-get install chromium) or set CHROMIUM=/path/to/it")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images" / "prefect-flow-run.png")
    parser.add_argument("--size", default="1600,1000", help="window width,height in pixels")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for the tiny run")
    args = parser.parse_args(argv)
    browser = chromium()
    with tempfile.TemporaryDirectory(prefix="nlsflow-ui-") as tmp:
        port = free_port()
        api = f"http://127.0.0.1:{port}/api"
        env = {
            **os.environ,
            "PREFECT_HOME": f"{tmp}/prefect-home",
            "PREFECT_UI_API_URL": api,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }
        env.pop("PREFECT_API_URL", None)
        with open(f"{tmp}/server.log", "w") as log:
            server = subprocess.Popen(
                [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            wait_until(lambda: httpx.get(f"{api}/health", timeout=5).status_code == 200, 180, "the Prefect server")
            print(f"Prefect server on http://127.0.0.1:{port}; running the tiny pipeline against it", file=sys.stderr)
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "flows.pipeline",
                    "--task",
                    "math",
                    "--profile",
                    "tiny",
                    "--method",
                    "shears",
                    f"run_dir={tmp}/run",
                    *LIGHT,
                    *args.overrides,
                ],
                cwd=REPO,
                env={**env, "PREFECT_API_URL": api},
                check=True,
            )
            (flow_run,) = httpx.post(f"{api}/flow_runs/filter", json={}, timeout=30).json()
            args.out.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(
                [
                    browser,
                    "--headless=new",
                    "--no-sandbox",  # as root in a container
                    "--disable-gpu",
                    "--hide-scrollbars",
                    f"--window-size={args.size}",
                    "--virtual-time-budget=20000",  # let the single-page app fetch and draw the run
                    f"--screenshot={args.out.resolve()}",
                    f"http://127.0.0.1:{port}/runs/flow-run/{flow_run['id']}",
                ],
                check=True,
                capture_output=True,
                timeout=300,
            )
        finally:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
