"""NSGA-II (pymoo) over a super-network's choice indices: maximise accuracy, minimise cost."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pymoo.algorithms.moo.nsga2 import NSGA2
from pymoo.core.problem import Problem
from pymoo.core.termination import Termination
from pymoo.operators.crossover.sbx import SBX
from pymoo.operators.mutation.pm import PM
from pymoo.operators.repair.rounding import RoundingRepair
from pymoo.optimize import minimize
from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting
from tqdm.auto import tqdm

from nlsflow.adapters.elastic import Subnet, Variable
from nlsflow.artifacts import read_table, write_table
from nlsflow.cluster import LocalPool
from nlsflow.errors import NlsflowError
from nlsflow.evaluation.intervals import proportion_interval

log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    eval_id: int
    subnet: Subnet
    accuracy: float
    cost: int
    seconds: float
    label: str = ""
    pareto: bool = False

    @property
    def key(self) -> str:
        return json.dumps(self.subnet, sort_keys=True)


def subnet_from_indices(space: list[Variable], indices) -> Subnet:
    return {v.name: v.choices[int(i)] for v, i in zip(space, indices)}


def indices_from_subnet(space: list[Variable], subnet: Subnet) -> list[int]:
    return [v.choices.index(subnet[v.name]) for v in space]


AccuracyPool = Callable[[list[Subnet]], Iterator[tuple[int, float, float]]]
"""Scores subnets' accuracies, in any order: yields (index in the list, accuracy, seconds) as each finishes."""


class SubnetEvaluator:
    """Scores subnets once each: a repeated config is answered from the cache, not re-generated.

    `evaluate_many` takes a whole population: its new subnets get their ids in the order asked (as one after
    another would) and go to the pool together; each is persisted as soon as it and every subnet asked before it
    have finished. With `cache_path` (Parquet, written atomically) a later evaluator on the same path starts from
    it: a search killed at any point loses only the evaluations in flight (and those finished ahead of one still
    in flight), and resumes with the ids an uninterrupted search gives.
    """

    def __init__(
        self,
        accuracy_fn: Callable[[Subnet], float] | None,
        cost_fn: Callable[[Subnet], int],
        cache_path: Path | None = None,
        pool: AccuracyPool | None = None,
    ):
        if pool is None and accuracy_fn is None:
            raise TypeError("SubnetEvaluator needs an accuracy_fn or a pool")
        self.pool = pool or LocalPool(lambda: accuracy_fn)
        self.cost_fn, self.cache_path = cost_fn, cache_path
        self.evaluations: dict[str, Evaluation] = {}
        self.progress = None
        if cache_path is not None and Path(cache_path).is_file():
            self.evaluations = _read_cache(Path(cache_path))
        self.resumed = len(self.evaluations)

    def _persist(self) -> None:
        if self.cache_path is not None:
            write_table(
                self.cache_path,
                "search_cache",
                [
                    {
                        "eval_id": e.eval_id,
                        "config": e.key,
                        "accuracy": e.accuracy,
                        "cost": e.cost,
                        "seconds": e.seconds,
                    }
                    for e in sorted(self.evaluations.values(), key=lambda e: e.eval_id)
                ],
            )

    def evaluate_many(self, subnets: list[Subnet], labels: list[str] | None = None) -> list[Evaluation]:
        keys = [json.dumps(s, sort_keys=True) for s in subnets]
        new = list(dict.fromkeys(k for k in keys if k not in self.evaluations))  # first asked, first numbered
        first_id = max((e.eval_id for e in self.evaluations.values()), default=-1) + 1
        todo = [json.loads(k) for k in new]
        finished: dict[int, tuple[float, float]] = {}
        done = 0  # todo[:done] are recorded: in id order, so that a cache never has a gap and a resumed search
        for i, accuracy, seconds in self.pool(todo) if todo else ():  # numbers its subnets as an uninterrupted one
            finished[i] = accuracy, seconds
            while done in finished:
                subnet, (accuracy, seconds) = todo[done], finished.pop(done)
                self.evaluations[new[done]] = Evaluation(
                    first_id + done, subnet, accuracy, self.cost_fn(subnet), seconds
                )
                done += 1
                self._persist()
                if self.progress is not None:
                    self.progress.update(1)
        found = [self.evaluations[k] for k in keys]
        for evaluation, label in zip(found, labels or []):
            if label and not evaluation.label:
                evaluation.label = label
        return found

    def __call__(self, subnet: Subnet, label: str = "") -> Evaluation:
        return self.evaluate_many([subnet], [label])[0]


def _read_cache(path: Path) -> dict[str, Evaluation]:
    """The evaluations a cache holds; an unreadable or mismatched cache is the search's own: it is set aside as
    `<name>.corrupt` (kept, not deleted) with a warning, and the search starts over."""
    try:
        rows = sorted(read_table(path, "search_cache").to_pylist(), key=lambda row: row["eval_id"])
        evaluations = {  # numbered again in order: a search killed mid-population leaves gaps
            row["config"]: Evaluation(i, json.loads(row["config"]), row["accuracy"], row["cost"], row["seconds"])
            for i, row in enumerate(rows)
        }
    except (NlsflowError, ValueError) as error:
        aside = _free_name(path.with_name(path.name + ".corrupt"))
        path.rename(aside)
        reason = str(error).split("; re-run")[0]  # read_table's fix names another stage, not this one
        reason = reason.removeprefix(f"{path} ") if reason.startswith(f"{path} ") else f"is unusable ({reason})"
        log.warning("search cache %s %s: discarded, kept as %s; the search starts over", path, reason, aside)
        return {}
    log.info("search cache %s: resuming from %d evaluations", path, len(evaluations))
    return evaluations


def _free_name(path: Path) -> Path:
    """`path`, or `path.1`, `path.2`, ... : the first that does not exist (an earlier one is never overwritten)."""
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.{n}")
    return candidate


class _UniqueEvaluations(Termination):
    """Stop once `budget` distinct subnets are scored (cache hits are free), or after `max_gen` stalled generations."""

    def __init__(self, scorer: SubnetEvaluator, budget: int, max_gen: int):
        super().__init__()
        self.scorer, self.budget, self.max_gen = scorer, budget, max_gen

    def _update(self, algorithm):
        return max(len(self.scorer.evaluations) / self.budget, algorithm.n_gen / self.max_gen)


class _SubnetProblem(Problem):
    """Vectorized: NSGA-II hands over each generation whole, and the evaluator scores its new subnets together."""

    def __init__(self, space: list[Variable], scorer: SubnetEvaluator):
        self.space, self.scorer = space, scorer
        super().__init__(
            n_var=len(space),
            n_obj=2,
            xl=np.zeros(len(space)),
            xu=np.array([len(v.choices) - 1 for v in space]),
            vtype=int,
        )

    def _evaluate(self, X, out, *args, **kwargs):
        subnets = [subnet_from_indices(self.space, np.round(x).astype(int)) for x in X]
        out["F"] = np.array([[-r.accuracy, r.cost] for r in self.scorer.evaluate_many(subnets)], dtype=float)


def nsga2_search(
    space: list[Variable],
    evaluate: SubnetEvaluator,
    *,
    population: int,
    num_evals: int,
    seed: int,
    seeds: dict[str, Subnet],
) -> list[Evaluation]:
    """NSGA-II from an initial population holding the named `seeds` subnets; every evaluation, Pareto-flagged."""
    rng = np.random.default_rng(seed)
    initial = [indices_from_subnet(space, s) for s in seeds.values()]
    while len(initial) < population:
        initial.append([int(rng.integers(len(v.choices))) for v in space])
    evaluate.evaluate_many(list(seeds.values()), list(seeds))
    size = math.prod(len(v.choices) for v in space)
    if len(evaluate.evaluations) >= size:  # the seeds are the whole space (plain LoRA: one subnet): nothing to search
        log.info("the search space holds %d subnet(s), all evaluated: NSGA-II not needed", size)
        return _flag_pareto(sorted(evaluate.evaluations.values(), key=lambda e: e.eval_id))
    algorithm = NSGA2(
        pop_size=population,
        sampling=np.array(initial[:population]),
        crossover=SBX(prob=0.9, eta=15, vtype=float, repair=RoundingRepair()),
        mutation=PM(eta=20, vtype=float, repair=RoundingRepair()),
        eliminate_duplicates=True,
    )
    budget = min(num_evals, size)
    termination = _UniqueEvaluations(evaluate, budget, max_gen=10 * math.ceil(budget / population) + 10)
    with tqdm(total=budget, desc="search", unit="subnet", initial=len(evaluate.evaluations)) as bar:
        evaluate.progress = bar
        minimize(
            _SubnetProblem(space, evaluate), algorithm, termination, copy_termination=False, seed=seed, verbose=False
        )
        evaluate.progress = None
    return _flag_pareto(sorted(evaluate.evaluations.values(), key=lambda e: e.eval_id))


def _flag_pareto(results: list[Evaluation]) -> list[Evaluation]:
    front = NonDominatedSorting().do(np.array([[-e.accuracy, e.cost] for e in results]), only_non_dominated_front=True)
    for i in front:
        results[i].pareto = True
    return results


CHOICE_RULES = ("min_cost_within_delta", "max_accuracy", "max_accuracy_within_budget")


def choose(
    evaluations: list[Evaluation],
    ref_acc: float,
    acc_delta: float,
    rule: str = "min_cost_within_delta",
    max_cost: float | None = None,
) -> Evaluation:
    """Pick one evaluated subnet by `rule` (ties go to the more accurate, then the cheaper):

    - min_cost_within_delta (the seeds'): the lowest cost with accuracy >= ref_acc - acc_delta, else the most accurate;
    - max_accuracy: the most accurate;
    - max_accuracy_within_budget: the most accurate with cost <= max_cost, else the cheapest.
    """
    most_accurate = max(evaluations, key=lambda e: (e.accuracy, -e.cost))
    if rule == "max_accuracy":
        return most_accurate
    if rule == "max_accuracy_within_budget":
        if max_cost is None:
            raise ValueError("rule max_accuracy_within_budget needs max_cost")
        within = [e for e in evaluations if e.cost <= max_cost]
        if not within:
            log.warning("no evaluated subnet costs <= %s; choosing the cheapest", max_cost)
        return (
            max(within, key=lambda e: (e.accuracy, -e.cost))
            if within
            else min(evaluations, key=lambda e: (e.cost, -e.accuracy))
        )
    if rule != "min_cost_within_delta":
        raise ValueError(f"unknown rule {rule!r}; use one of {CHOICE_RULES}")
    eligible = [e for e in evaluations if e.accuracy >= ref_acc - acc_delta]
    return min(eligible, key=lambda e: (e.cost, -e.accuracy)) if eligible else most_accurate


def plot_search(
    evaluations: list[Evaluation], chosen: Evaluation, cost_name: str, folder: Path, records: int | None = None
) -> None:
    """`pareto_front.png` (accuracy vs cost, named subnets marked; with `records`, the validation accuracy's 95%
    Wilson interval on the front), `search_progression.png` (accuracy by evaluation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter([e.cost for e in evaluations], [e.accuracy for e in evaluations], s=14, c="lightgray", label="evaluated")
    front = sorted((e for e in evaluations if e.pareto), key=lambda e: e.cost)
    ax.plot([e.cost for e in front], [e.accuracy for e in front], "o-", c="tab:blue", label="Pareto front")
    if records:
        low, high = np.array([proportion_interval(e.accuracy, records) for e in front]).T
        accuracy = np.array([e.accuracy for e in front])
        ax.errorbar(
            [e.cost for e in front],
            accuracy,
            yerr=[accuracy - low, high - accuracy],
            fmt="none",
            ecolor="tab:blue",
            alpha=0.5,
            capsize=3,
            label=f"95% interval ({records} records)",
        )
    for e in evaluations:
        if e.label:
            ax.annotate(e.label, (e.cost, e.accuracy), fontsize=8, xytext=(3, 3), textcoords="offset points")
    ax.scatter([chosen.cost], [chosen.accuracy], marker="*", s=160, c="tab:red", label="chosen", zorder=3)
    ax.set(xlabel=cost_name, ylabel="validation accuracy", title="Pareto front")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(Path(folder) / "pareto_front.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    ids, accuracies = [e.eval_id for e in evaluations], [e.accuracy for e in evaluations]
    ax.plot(ids, accuracies, ".", c="tab:gray", label="evaluation")
    ax.plot(ids, np.maximum.accumulate(accuracies), c="tab:green", label="best so far")
    ax.set(xlabel="evaluation", ylabel="validation accuracy", title="search progression")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(Path(folder) / "search_progression.png", dpi=110)
    plt.close(fig)
