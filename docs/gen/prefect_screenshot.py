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
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

from flows.local_server import local_prefect_server

REPO = Path(__file__).resolve().parents[2]
LIGHT = ["train.max_steps=40", "search.num_evals=6", "evaluate.baselines=[pruned]"]  # a quick run, every panel


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
    with (
        tempfile.TemporaryDirectory(prefix="nlsflow-ui-") as tmp,
        local_prefect_server(Path(tmp) / "prefect-home", Path(tmp) / "server.log") as api,
    ):
        print(f"Prefect server at {api}; running the tiny pipeline against it", file=sys.stderr)
        env = {**os.environ, "PREFECT_HOME": f"{tmp}/client-home", "PREFECT_API_URL": api}
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
            env=env,
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
                api.removesuffix("/api") + f"/runs/flow-run/{flow_run['id']}",
            ],
            check=True,
            capture_output=True,
            timeout=300,
        )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
