"""`make worker`: serve the `nlsflow` deployment, so that runs started from the Prefect UI run on this machine.

    PREFECT_API_URL=http://127.0.0.1:4200/api python -m flows.serve

The UI's "Run" form takes the same parameters as `make pipeline`: task, profile, method, runner, gpus, run_dir and
key=value overrides (defaults from NLSFLOW_RUNNER, NLSFLOW_GPUS and NLSFLOW_RUNS, which docker-compose.yml sets).
The process registers the deployment with the server, polls it for scheduled runs and executes each (the pipeline
flow as a subflow), until stopped with Ctrl-C.
"""

from __future__ import annotations

import os
from pathlib import Path

from prefect import flow

from flows.pipeline import pipeline
from flows.stage_process import REPO_ROOT
from nlsflow.layers import config_files

DEPLOYMENT = "nlsflow"


RUNS = Path(os.environ.get("NLSFLOW_RUNS", REPO_ROOT / "runs"))  # where runs go unless run_dir says otherwise


@flow(name="nlsflow")
def nlsflow(
    task: str = "math",
    profile: str = "tiny",
    method: str = "shears",
    runner: str = os.environ.get("NLSFLOW_RUNNER", "local"),
    gpus: str = os.environ.get("NLSFLOW_GPUS", "none"),
    run_dir: str = "",
    overrides: list[str] | None = None,
) -> list[dict]:
    """The pipeline for a (task, profile, method), in `run_dir` (default $NLSFLOW_RUNS/<task>-<profile>-<method>).

    runner: local (this machine) or docker (a container per stage, `gpus` each: all, a count, device=0,1, none).
    """
    run_dir = run_dir or str(RUNS / f"{task}-{profile}-{method}")
    files = [str(f) for f in config_files(task, profile, method)]
    options = {"gpus": gpus} if runner == "docker" else None
    return pipeline(files, [f"run_dir={run_dir}", *(overrides or [])], runner, runner_options=options)


if __name__ == "__main__":
    nlsflow.serve(name=DEPLOYMENT, description="nlsflow: prune, train, evaluate, search, extract, benchmark")
