"""The Ray pool on a local cluster of 2 workers: the search it scores equals the serial one, a killed worker's
subnet goes to another, and what the cluster cannot do is one line; the search and evaluate stages on 2 workers
write what one writes. Each test's cluster is shut down by it (the pool's own `ray.shutdown`)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import psutil
import pytest
import ray
from conftest import MATH_RUN, REPO, TINY_CONFIGS, tiny_config, tiny_overrides
from test_nas import SPACE, _objectives

from nlsflow.adapters.elastic import heuristic_subnet, maximal_subnet
from nlsflow.artifacts import read_manifest, read_table, stage_dir
from nlsflow.cluster import LocalPool, ray_pool
from nlsflow.errors import NlsflowError
from nlsflow.evaluation.scoring import subnet_accuracy, validation_accuracy_pool
from nlsflow.evaluation.workers import SubnetScorer, SupernetLoad
from nlsflow.search.nsga2 import SubnetEvaluator, nsga2_search
from schemas.config import GenerationConfig
from stages import evaluate, search
from stages._common import run_stage

SEEDS = {"heuristic": heuristic_subnet(SPACE), "maximal": maximal_subnet(SPACE)}


def _accuracy(subnet, crash_marker: str | None = None) -> float:
    """The synthetic objective; with `crash_marker`, the first worker to score a rank-2 subnet dies (once)."""
    if crash_marker and min(subnet.values()) == 2 and not Path(crash_marker).exists():
        Path(crash_marker).touch()
        os._exit(1)
    accuracy, _, _ = _objectives()
    return accuracy(subnet)


def _load(crash_marker: str | None = None):
    return partial(_accuracy, crash_marker=crash_marker)


def _search(pool=None):
    accuracy, cost, _ = _objectives()
    evaluator = SubnetEvaluator(accuracy, cost, pool=pool)
    results = nsga2_search(SPACE, evaluator, population=6, num_evals=24, seed=5, seeds=SEEDS)
    return [(e.eval_id, e.subnet, e.accuracy, e.cost, e.label, e.pareto) for e in results]


def test_two_workers_give_the_serial_search_even_when_one_dies(tmp_path):
    serial = _search()
    with ray_pool(_load, workers=2) as pool:
        assert _search(pool) == serial
    assert not ray.is_initialized()
    marker = tmp_path / "crashed"
    with ray_pool(partial(_load, str(marker)), workers=2) as pool:
        assert _search(pool) == serial
        assert marker.exists()  # a worker did die, and its subnet was scored by another


def test_what_the_cluster_cannot_do_is_one_line():
    with pytest.raises(NlsflowError, match=r"need 1 GPUs but the Ray cluster has 0; lower the workers"):
        with ray_pool(_load, workers=1, gpus_per_worker=1):
            pass
    assert not ray.is_initialized()
    with pytest.raises(NlsflowError, match=r"cannot reach the Ray cluster at 127.0.0.1:1 .*check cluster.address"):
        with ray_pool(_load, workers=1, address="127.0.0.1:1"):
            pass


def _fresh_copy(math_run, tmp_path, *drop: str) -> Path:
    run = tmp_path / "run"
    shutil.copytree(math_run.run_dir, run)
    for stage in drop:
        shutil.rmtree(stage_dir(run, stage))
    shutil.rmtree(run / ".cache", ignore_errors=True)  # the search's evaluations: scored again here
    return run


def _evaluations(run: Path) -> list[dict]:
    rows = read_table(stage_dir(run, "search") / "evaluations.parquet", "evaluations").to_pylist()
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_the_search_stage_on_two_workers_equals_one(math_run, tmp_path):
    run = _fresh_copy(math_run, tmp_path, "search", "extract", "benchmark")
    cfg = tiny_config(run, *MATH_RUN, "search.workers=2", "cluster.cpus_per_worker=1")
    assert run_stage("search", search.run, cfg) is not None
    assert not ray.is_initialized()
    assert _evaluations(run) == _evaluations(Path(math_run.run_dir))  # ids, configs, accuracies, costs, order
    chosen = "search/chosen.json"
    assert (run / chosen).read_bytes() == (Path(math_run.run_dir) / chosen).read_bytes()


def test_the_evaluate_stage_on_two_workers_equals_one_with_baselines(math_run, tmp_path):
    run = _fresh_copy(math_run, tmp_path, "evaluate", "benchmark")
    serial = tmp_path / "serial"
    shutil.copytree(run, serial)
    extra = ("evaluate.baselines=[pruned, dense]", "evaluate.generation.batch_size=2")
    assert run_stage("evaluate", evaluate.run, tiny_config(serial, *MATH_RUN, *extra)) is not None
    assert run_stage("evaluate", evaluate.run, tiny_config(run, *MATH_RUN, *extra, "evaluate.workers=2")) is not None
    assert not ray.is_initialized()
    tables = [read_table(stage_dir(r, "evaluate") / "predictions.parquet", "predictions") for r in (serial, run)]
    assert tables[0].equals(tables[1])
    assert {m for m in tables[1].column("model").to_pylist()} == {"heuristic", "pruned", "dense"}
    metrics = [read_manifest(stage_dir(r, "evaluate"), "evaluate").metrics for r in (serial, run)]
    assert metrics[1].pop("workers") == 2 and metrics[0].pop("workers") == 1
    assert metrics[0] == metrics[1]
    differences = metrics[1]["differences"]  # paired, on the same records: the difference of the averages
    assert set(differences) == {"heuristic - pruned", "heuristic - dense", "pruned - dense"}
    pruned, dense = metrics[1]["baselines"]["pruned"], metrics[1]["baselines"]["dense"]
    assert differences["pruned - dense"]["difference"] == pytest.approx(
        pruned["average_accuracy"] - dense["average_accuracy"]
    )


def test_a_population_smaller_than_the_pool_splits_each_subnet_and_scores_the_same(math_run):
    """5 workers, 2 subnets: each subnet's validation goes out in 3 shards of whole batches, in this process."""
    run = Path(math_run.run_dir)
    supernet = SupernetLoad(math_run, stage_dir(run, "prune") / "model", stage_dir(run, "train"))
    model, tokenizer, space = supernet()
    validation = read_table(stage_dir(run, "train") / "validation.parquet", "records").to_pylist()[:16]
    generation = GenerationConfig(max_new_tokens=12, num_beams=1, batch_size=2)
    subnets = [heuristic_subnet(space), maximal_subnet(space)]
    serial = [
        subnet_accuracy(model, tokenizer, space, validation, s, max_new_tokens=12, num_beams=1, batch_size=2)
        for s in subnets
    ]

    class FiveWide(LocalPool):
        workers = 5
        items: list = []

        def __call__(self, items):
            self.items += items
            return super().__call__(items)

    pool = FiveWide(SubnetScorer(lambda: (model, tokenizer, space), generation))
    found = validation_accuracy_pool(pool, tokenizer, validation, batch_size=2)(subnets)
    assert sorted((k, accuracy) for k, accuracy, _ in found) == list(enumerate(serial))
    shards = [shard for subnet, shard in pool.items if subnet == subnets[0]]
    assert len(shards) >= 3 and sorted(p for s in shards for p in s.positions) == sorted(
        p for source in {r["source"] for r in validation} for p in range(sum(r["source"] == source for r in validation))
    )


def test_sigterm_stops_a_search_on_workers_in_one_line_and_leaves_no_ray_process(math_run, tmp_path):
    """ray.init installs its own SIGTERM handler; the stage keeps its own: exit 143, one line, Ray gone."""
    run = _fresh_copy(math_run, tmp_path, "search", "extract", "benchmark")
    configs = [arg for path in TINY_CONFIGS for arg in ("--config", str(path))]
    extra = ["search.workers=2", "search.num_evals=400", "search.val_samples=16"]
    cmd = [sys.executable, "-m", "stages.search", *configs, *tiny_overrides(run, *MATH_RUN, *extra)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not list((run / ".cache").glob("search-*.parquet")) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            time.sleep(0.2)
        ray_processes = psutil.Process(proc.pid).children(recursive=True)
        assert ray_processes, "the search runs no Ray cluster"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "error: search: stopped by SIGTERM" in err.splitlines()[-1]
    _, alive = psutil.wait_procs(ray_processes, timeout=30)
    assert not alive, [p.cmdline()[:2] for p in alive]
