"""Prefect for real: retries on a killed stage only, and a Prefect server on loopback that a pipeline run and the
served deployment report to, read back through its REST API."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import DATA_ROOT, LIGHT_BENCHMARK, REPO, TINY_CONFIGS, needs_data, tiny_overrides
from prefect.client.base import PrefectHttpxSyncClient

from flows import runners
from flows.local_server import local_prefect_server, wait_until
from flows.runners import LocalRunner
from flows.stage_process import StageInterrupted
from nlsflow.artifacts import stage_dir
from nlsflow.errors import NlsflowError
from schemas import STAGES

pytestmark = [pytest.mark.slow, needs_data]


class FlakyRunner(LocalRunner):
    """Fails each stage's first attempt the way `fail_with` says, then runs it for real."""

    calls: list[str] = []
    fail_with: type[Exception] = StageInterrupted

    def run(self, stage, config_file, log, force=False):
        FlakyRunner.calls.append(stage)
        if FlakyRunner.calls.count(stage) == 1:
            raise FlakyRunner.fail_with(f"stage '{stage}' was killed by signal 9")
        super().run(stage, config_file, log, force)


@pytest.mark.parametrize(
    "fail_with, calls, completed",
    [(StageInterrupted, 2, True), (NlsflowError, 1, False)],
    ids=["killed: retried", "stage error: not retried"],
)
def test_only_interrupted_stages_are_retried(math_run, tmp_path, monkeypatch, fail_with, calls, completed):
    from flows.pipeline import pipeline

    run_dir = tmp_path / "run"
    shutil.copytree(math_run.run_dir, run_dir)
    shutil.rmtree(stage_dir(run_dir, "benchmark"))  # the only stage left to run
    monkeypatch.setitem(runners.RUNNERS, "flaky", FlakyRunner)
    monkeypatch.setattr(FlakyRunner, "calls", [])
    monkeypatch.setattr(FlakyRunner, "fail_with", fail_with)
    state = pipeline([str(p) for p in TINY_CONFIGS], tiny_overrides(run_dir), "flaky", return_state=True)
    assert FlakyRunner.calls == ["benchmark"] * calls
    assert state.is_completed() == completed and stage_dir(run_dir, "benchmark").is_dir() == completed


@pytest.fixture
def prefect_server(tmp_path):
    """A real Prefect server of its own (flows.local_server); yields the API URL and Prefect's own HTTP client for it
    (which retries the 503s a SQLite-backed server answers while another process writes); stopped afterwards."""
    with local_prefect_server(tmp_path / "prefect-home", tmp_path / "server.log") as api:
        with PrefectHttpxSyncClient(base_url=api, timeout=30) as client:
            yield api, client


TINY = [f"data.root={DATA_ROOT}", "train.max_steps=20", "search.num_evals=4", "evaluate.max_samples=2", LIGHT_BENCHMARK]
WITH_PRUNED = [*TINY, "evaluate.baselines=[pruned]"]  # a baseline: the summary shows the paired difference


def test_pipeline_and_deployment_report_to_a_real_server(prefect_server, tmp_path):
    (api, client), run_dir = prefect_server, tmp_path / "run"
    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_HOME": str(tmp_path / "client-home")}
    proc = subprocess.run(
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
            f"run_dir={run_dir}",
            *WITH_PRUNED,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]

    (flow_run,) = client.post("/flow_runs/filter", json={}).json()
    assert flow_run["state"]["type"] == "COMPLETED"
    task_runs = client.post("/task_runs/filter", json={"flow_runs": {"id": {"any_": [flow_run["id"]]}}}).json()
    assert sorted(t["name"] for t in task_runs) == sorted(STAGES) and {t["state"]["type"] for t in task_runs} == {
        "COMPLETED"
    }
    artifacts = {a["key"]: a for a in client.post("/artifacts/filter", json={}).json() if a["key"]}
    assert {
        "nlsflow-summary",
        "nlsflow-accuracy",
        "nlsflow-pareto-front",
        "nlsflow-benchmark",
        "train-progress",
    } <= set(artifacts)
    assert (
        artifacts["nlsflow-summary"]["type"] == "markdown" and "chosen subnet" in artifacts["nlsflow-summary"]["data"]
    )
    assert artifacts["train-progress"]["type"] == "progress" and artifacts["train-progress"]["data"] == 100
    assert '"model": "heuristic subnet"' in artifacts["nlsflow-accuracy"]["data"]
    assert '"average_95%": "[' in artifacts["nlsflow-accuracy"]["data"]  # each average with its interval
    assert re.search(r"heuristic - pruned [+-]\d+\.\d \[", artifacts["nlsflow-summary"]["data"])  # paired
    assert '"label"' in artifacts["nlsflow-pareto-front"]["data"]
    benchmark = artifacts["nlsflow-benchmark"]["data"]
    assert "| extracted_merged |" in benchmark and benchmark.count("](data:image/png;base64,") == 2

    # the served deployment: a run started through the API with the UI's parameters; the run folder is finished,
    # so every stage is skipped by its content digests
    mtimes = {s: (stage_dir(run_dir, s) / "manifest.json").stat().st_mtime_ns for s in STAGES}
    worker = subprocess.Popen(
        [sys.executable, "-m", "flows.serve"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deployment = wait_until(
            lambda: client.get("/deployments/name/nlsflow/nlsflow").json()["id"], 120, "the nlsflow deployment"
        )
        parameters = {
            "task": "math",
            "profile": "tiny",
            "method": "shears",
            "run_dir": str(run_dir),
            "overrides": WITH_PRUNED,
        }
        run = client.post(f"/deployments/{deployment}/create_flow_run", json={"parameters": parameters}).json()
        final = wait_until(
            lambda: (
                (r := client.get(f"/flow_runs/{run['id']}").json())["state"]["type"]
                in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
                and r
            ),
            300,
            "the deployment's flow run",
        )
    finally:
        worker.terminate()
        worker.wait(30)
    assert final["state"]["type"] == "COMPLETED", final["state"]
    assert {s: (stage_dir(run_dir, s) / "manifest.json").stat().st_mtime_ns for s in STAGES} == mtimes
