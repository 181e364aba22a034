"""`make worker`: serve the `nlsflow` deployment, so that runs started from the Prefect UI run on this machine.

    PREFECT_API_URL=http://127.0.0.1:4200/api python -m flows.serve

The UI's "Run" form takes the same parameters as `make pipeline`: task, profile, method, runner, run_dir and
key=value overrides. The process registers the deployment with the server, polls it for scheduled runs and
executes each (the pipeline flow as a subflow), until stopped with Ctrl-C.
"""
from __future__ import annotations

from prefect import flow

from flows.pipeline import pipeline
from flows.runners import REPO_ROOT
from schemas.layers import config_files

DEPLOYMENT = "nlsflow"


@flow(name="nlsflow")
def nlsflow(task: str = "math", profile: str = "tiny", method: str = "shears", runner: str = "local", run_dir: str = "",
            overrides: list[str] | None = None) -> list[dict]:
    """The pipeline for a (task, profile, method), in `run_dir` (default runs/<task>-<profile>-<method>)."""
    run_dir = run_dir or str(REPO_ROOT / "runs" / f"{task}-{profile}-{method}")
    files = [str(f) for f in config_files(task, profile, method)]
    return pipeline(files, [f"run_dir={run_dir}", *(overrides or [])], runner)


if __name__ == "__main__":
    nlsflow.serve(name=DEPLOYMENT, description="nlsflow: prune, train, evaluate, search, extract, benchmark")
