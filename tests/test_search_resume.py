"""A search killed with SIGKILL mid-way resumes from its evaluation cache and evaluates no subnet twice."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
from conftest import REPO, TINY_CONFIGS, tiny_overrides

from nlsflow.artifacts import read_manifest, read_table, stage_dir

pytestmark = pytest.mark.slow
SEARCH = ["search.num_evals=24", "search.val_samples=16", "search.generation.max_new_tokens=24"]


def _search_cmd(run_dir) -> list[str]:
    configs = [arg for path in TINY_CONFIGS for arg in ("--config", str(path))]
    return [sys.executable, "-m", "stages.search", *configs, *tiny_overrides(run_dir, *SEARCH)]


def _cached_rows(run_dir) -> int:
    caches = list((run_dir / ".cache").glob("search-*.parquet"))
    try:
        return pq.read_metadata(caches[0]).num_rows if caches else 0
    except OSError:  # mid-replace: try again
        return 0


def test_sigkill_then_rerun_finishes_without_repeating_an_evaluation(math_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(math_run.run_dir, run)
    shutil.rmtree(stage_dir(run, "search"))
    shutil.rmtree(run / ".cache")  # the fixture's own search cache (other settings)
    proc = subprocess.Popen(_search_cmd(run), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while _cached_rows(run) < 4 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _cached_rows(run)
    assert 4 <= killed_at < 24, "the search finished (or never started) before it could be killed"
    assert not stage_dir(run, "search").exists()  # only a hidden temp folder, which the next run removes

    done = subprocess.run(_search_cmd(run), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from {killed_at} evaluations" in done.stderr, [
        l for l in done.stderr.splitlines() if "cache" in l
    ]
    metrics = read_manifest(stage_dir(run, "search"), "search").metrics
    assert metrics["resumed_from_cache"] == killed_at
    rows = read_table(stage_dir(run, "search") / "evaluations.parquet", "evaluations").to_pylist()
    # Each config once (NSGA-II may converge before the budget when every accuracy ties, as on the random tiny model).
    assert len(rows) == len({r["config"] for r in rows}) > killed_at
    assert sorted(r["eval_id"] for r in rows) == list(range(len(rows)))
    assert not list(run.glob(".search*"))
