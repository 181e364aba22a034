"""The Ray pool on a local cluster of 2 workers: the search it scores equals the serial one, a killed worker's
subnet goes to another, and what the cluster cannot do is one line. Each test's cluster is shut down by it."""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import pytest
from test_nas import SPACE, _objectives

from nlsflow.adapters.elastic import heuristic_subnet, maximal_subnet
from nlsflow.cluster import ray_pool
from nlsflow.errors import NlsflowError
from nlsflow.search.nsga2 import SubnetEvaluator, nsga2_search

ray = pytest.importorskip("ray")
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
