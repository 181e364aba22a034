"""NSGA-II search on a synthetic objective: budget, cache, Pareto flags and the seeds' choice rule."""

from __future__ import annotations

import itertools

import pytest

from nlsflow.adapters.elastic import Variable, heuristic_subnet, maximal_subnet, minimal_subnet
from nlsflow.search.nsga2 import Evaluation, SubnetEvaluator, choose, nsga2_search

SPACE = [Variable(f"layers.{i}.qkv", (f"m{i}",), (8, 6, 4, 2)) for i in range(4)]


def _objectives():
    calls = []

    def accuracy(subnet):  # more rank helps, layer 0 most; saturates at rank 6 for layer 3
        calls.append(dict(subnet))
        weights = (0.4, 0.3, 0.2, 0.1)
        return round(sum(w * min(subnet[v.name], 6) / 6 for w, v in zip(weights, SPACE) if v.name in subnet), 6)

    def cost(subnet):
        return sum(subnet.values())

    return accuracy, cost, calls


def test_search_respects_budget_caches_and_flags_the_true_front():
    accuracy, cost, calls = _objectives()
    scorer = SubnetEvaluator(accuracy, cost)
    seeds = {"heuristic": heuristic_subnet(SPACE), "maximal": maximal_subnet(SPACE), "minimal": minimal_subnet(SPACE)}
    results = nsga2_search(SPACE, scorer, population=6, num_evals=30, seed=0, seeds=seeds)
    assert 30 <= len(results) < 30 + 6  # checked once per generation
    assert len(calls) == len(results) == len({tuple(sorted(c.items())) for c in calls})  # each subnet scored once
    assert {r.label for r in results} >= {"heuristic", "maximal", "minimal"}
    for r in results:
        dominated = any(
            o.accuracy >= r.accuracy and o.cost <= r.cost and (o.accuracy, o.cost) != (r.accuracy, r.cost)
            for o in results
        )
        assert r.pareto == (not dominated)


def test_search_stops_when_the_space_is_exhausted():
    accuracy, cost, _ = _objectives()
    tiny_space = SPACE[:2]
    scorer = SubnetEvaluator(accuracy, cost)
    results = nsga2_search(tiny_space, scorer, population=4, num_evals=1000, seed=1, seeds={})
    assert len(results) <= len(list(itertools.product(*(v.choices for v in tiny_space))))


def test_choose_lowest_cost_within_delta_else_most_accurate():
    evals = [
        Evaluation(0, {"a": 8}, 0.50, 100, 0.0),
        Evaluation(1, {"a": 6}, 0.49, 80, 0.0),
        Evaluation(2, {"a": 4}, 0.45, 60, 0.0),
        Evaluation(3, {"a": 2}, 0.495, 80, 0.0),
    ]
    assert choose(evals, ref_acc=0.50, acc_delta=0.01).eval_id == 3  # cost 80 ties: the more accurate
    assert choose(evals, ref_acc=0.50, acc_delta=0.06).eval_id == 2
    assert choose(evals, ref_acc=0.90, acc_delta=0.01).eval_id == 0


def test_choose_alternative_rules():
    evals = [
        Evaluation(0, {"a": 8}, 0.50, 100, 0.0),
        Evaluation(1, {"a": 6}, 0.52, 90, 0.0),
        Evaluation(2, {"a": 4}, 0.45, 60, 0.0),
        Evaluation(3, {"a": 2}, 0.52, 70, 0.0),
    ]
    assert choose(evals, 0.5, 0.01, rule="max_accuracy").eval_id == 3  # 0.52 twice: the cheaper
    assert choose(evals, 0.5, 0.01, rule="max_accuracy_within_budget", max_cost=65).eval_id == 2
    assert choose(evals, 0.5, 0.01, rule="max_accuracy_within_budget", max_cost=95).eval_id == 3
    assert choose(evals, 0.5, 0.01, rule="max_accuracy_within_budget", max_cost=10).eval_id == 2  # none fits: cheapest
    with pytest.raises(ValueError, match="unknown rule"):
        choose(evals, 0.5, 0.01, rule="knee")


def test_a_pool_finishing_in_any_order_gives_the_serial_search():
    """Populations go to the pool whole; ids follow the order asked, not the order finished."""
    seeds = {"heuristic": heuristic_subnet(SPACE), "maximal": maximal_subnet(SPACE)}

    def search(pool=None):
        accuracy, cost, _ = _objectives()
        evaluator = SubnetEvaluator(accuracy, cost, pool=pool and pool(accuracy))
        results = nsga2_search(SPACE, evaluator, population=6, num_evals=30, seed=3, seeds=seeds)
        return [(e.eval_id, e.subnet, e.accuracy, e.cost, e.label, e.pareto) for e in results]

    def last_first(accuracy):
        def score(subnets):
            for i in reversed(range(len(subnets))):
                yield i, accuracy(subnets[i]), 0.0

        return score

    assert search(last_first) == search()


def test_a_search_killed_while_a_pool_finishes_out_of_order_resumes_as_if_uninterrupted(tmp_path):
    """Killed after the pool finished the later subnets of a population first: the cache keeps only an unbroken
    run of ids, and the resumed search numbers and chooses as one that was never stopped."""
    seeds = {"heuristic": heuristic_subnet(SPACE), "maximal": maximal_subnet(SPACE)}
    accuracy, cost, _ = _objectives()

    def killed_at_call(n):
        calls = []

        def score(subnets):
            calls.append(len(subnets))
            for done, i in enumerate(reversed(range(len(subnets)))):  # last asked, first finished
                if len(calls) == n and done == len(subnets) - 1:
                    raise KeyboardInterrupt  # before the first-asked subnet comes back
                yield i, accuracy(subnets[i]), 0.0

        return score

    def search(pool=None, cache=None):
        evaluator = SubnetEvaluator(accuracy, cost, cache_path=cache, pool=pool)
        results = nsga2_search(SPACE, evaluator, population=6, num_evals=30, seed=3, seeds=seeds)
        return [(e.eval_id, e.subnet, e.accuracy, e.cost, e.label, e.pareto) for e in results]

    cache = tmp_path / "cache.parquet"
    with pytest.raises(KeyboardInterrupt):
        search(killed_at_call(3), cache)
    kept = SubnetEvaluator(accuracy, cost, cache_path=cache).evaluations
    assert sorted(e.eval_id for e in kept.values()) == list(range(len(kept)))
    assert search(None, cache) == search()
