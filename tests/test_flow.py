"""End to end: `python -m flows.pipeline` (what `make pipeline` runs) under Prefect's embedded server, then resume."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from conftest import DATA_ROOT, LIGHT_BENCHMARK, REPO, TINY_CONFIGS, needs_data

from nlsflow.artifacts import read_manifest, stage_dir
from schemas import STAGES

pytestmark = [pytest.mark.slow, needs_data]


def _pipeline(run_dir, *extra: str) -> str:
    configs = [arg for path in TINY_CONFIGS for arg in ("--config", str(path))]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.pipeline",
            *configs,
            f"run_dir={run_dir}",
            f"data.root={DATA_ROOT}",
            LIGHT_BENCHMARK,
            "train.max_steps=40",  # the flow's bookkeeping is under test here, not what training reaches
            *extra,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout


def _statuses(summary: str) -> dict[str, str]:
    return dict(re.findall(rf"│ ({'|'.join(STAGES)})\s+│ (ran|skipped)", summary))


def test_pipeline_runs_resumes_and_reruns_from_a_changed_stage(tmp_path):
    run_dir = tmp_path / "math-tiny"
    batches = "train.micro_batch_size=4"  # 2 processes x 4 = the tiny profile's batch of 8
    first = _pipeline(run_dir, batches, "train.processes=2", "search.workers=2", "evaluate.workers=2")
    assert _statuses(first) == dict.fromkeys(STAGES, "ran")
    for stage in STAGES:
        read_manifest(stage_dir(run_dir, stage), stage)
    assert read_manifest(stage_dir(run_dir, "train"), "train").output.processes == 2
    assert read_manifest(stage_dir(run_dir, "search"), "search").output.workers == 2  # on a local Ray cluster
    assert read_manifest(stage_dir(run_dir, "evaluate"), "evaluate").output.workers == 2
    assert "heuristic accuracy" in first and "params before/after" in first and "chosen subnet" in first
    assert (run_dir / "config.yaml").is_file()

    # how many processes trained or workers scored is not part of the result: one process finds it up to date
    assert _statuses(_pipeline(run_dir, batches)) == dict.fromkeys(STAGES, "skipped")

    changed = _statuses(_pipeline(run_dir, batches, "search.population=5"))
    assert changed == {
        "prune": "skipped",
        "train": "skipped",
        "evaluate": "skipped",
        "search": "ran",
        "extract": "ran",
        "benchmark": "ran",
    }


def test_pipeline_reports_a_failing_stage_in_one_line(tmp_path):
    configs = [arg for path in TINY_CONFIGS for arg in ("--config", str(path))]
    proc = subprocess.run(
        [sys.executable, "-m", "flows.pipeline", *configs, f"run_dir={tmp_path}", f"data.root={tmp_path / 'nowhere'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 2
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert error and "stage 'prune' failed" in error[-1] and "missing data file" in error[-1]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "prune").exists()
