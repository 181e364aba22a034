"""Stage 4, search: NSGA-II over the super-network's elastic choices, scored on the held-out validation slice.

Writes `search/evaluations.parquet` (every evaluated subnet, its objectives, Pareto flag), `search/chosen.json`,
`search/search_progression.{csv,png}` as the seeds do, and `search/pareto_front.png` (heuristic, maximal, minimal
and the chosen subnet marked). Evaluations are cached as they happen: a killed search resumes where it stopped.
NSGA-II hands over each generation whole; with `search.workers` > 1 its subnets are scored concurrently by Ray
workers that each hold the super-network (`nlsflow.cluster`), with the same results as one worker.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Callable
from dataclasses import replace
from functools import partial

from nlsflow.adapters.supernet import NAMED_SUBNETS
from nlsflow.artifacts import read_table, write_json, write_table
from nlsflow.cluster import scoring_pool
from nlsflow.data.datasets import EVAL_DATASETS
from nlsflow.errors import NlsflowError
from nlsflow.evaluation.scoring import validation_accuracy_pool
from nlsflow.evaluation.workers import SubnetScorer, SupernetLoad
from nlsflow.io import atomic_write_text, sha256_json
from nlsflow.methods import method_for
from nlsflow.search.nsga2 import AccuracyPool, Evaluation, SubnetEvaluator, choose, nsga2_search, plot_search
from schemas.files import ChosenSubnetFile
from schemas.outputs import PruneOutput, SearchOutput, TrainOutput
from stages._common import StageContext, main

log = logging.getLogger(__name__)


def run(ctx: StageContext) -> SearchOutput:
    cfg, sc = ctx.cfg, ctx.cfg.search
    train_dir = ctx.input_dir("train")
    method = method_for(cfg)
    supernet = SupernetLoad(cfg, ctx.input_dir("prune") / PruneOutput.files.model, train_dir)
    validation = read_table(train_dir / TrainOutput.files.validation, "records").to_pylist()[: sc.val_samples]
    choice_sets = {name for name, dataset in EVAL_DATASETS.items() if dataset.kind == "choice"}
    if sc.objective == "cloze" and (open_sets := sorted({r["source"] for r in validation} - choice_sets)):
        raise NlsflowError(
            f"search.objective=cloze scores multiple choice only, and the validation records of {open_sets} have "
            "open answers; set search.objective=generated"
        )
    if sc.workers > 1 or cfg.cluster.address:  # scored by Ray workers; this process only needs the costs
        model, tokenizer, space = replace(supernet, device="cpu")()
        scorer = SubnetScorer(supernet, sc.generation, sc.objective)
    else:
        model, tokenizer, space = supernet()
        scorer = SubnetScorer(lambda: (model, tokenizer, space), sc.generation, sc.objective)
    seeds = {name: fn(space) for name, fn in NAMED_SUBNETS.items()}
    with scoring_pool(scorer, sc.workers, cfg.cluster, cfg.device) as pool:
        accuracies = validation_accuracy_pool(pool, tokenizer, validation, sc.generation.batch_size)
        evaluate = cached_evaluator(ctx, model, space, method, accuracies)
        evaluations = nsga2_search(
            space, evaluate, population=sc.population, num_evals=sc.num_evals, seed=cfg.seed, seeds=seeds
        )
        heuristic = evaluate(seeds["heuristic"])  # by subnet, not label: in a one-subnet space they coincide
        maximal = evaluate(seeds["maximal"])
    ref_acc = heuristic.accuracy if sc.ref_acc is None else sc.ref_acc
    max_cost = None if sc.cost_budget is None else sc.cost_budget * maximal.cost
    chosen = choose(evaluations, ref_acc, sc.acc_delta, sc.rule, max_cost)
    log.info(
        "chosen subnet: accuracy %.4f, %s %d (heuristic: %.4f, %d)",
        chosen.accuracy,
        sc.cost,
        chosen.cost,
        heuristic.accuracy,
        heuristic.cost,
    )

    write_evaluations(ctx.out_dir / SearchOutput.files.evaluations, evaluations, partial(method.cost, model, space))
    write_json(ctx.out_dir / SearchOutput.files.chosen, ChosenSubnetFile(chosen.subnet))
    write_progression(ctx.out_dir / SearchOutput.files.progression, evaluations, sc.cost)
    plot_search(evaluations, chosen, sc.cost, ctx.out_dir, records=len(validation))
    return SearchOutput(
        evaluations=len(evaluations),
        resumed_from_cache=evaluate.resumed,
        pareto_size=sum(e.pareto for e in evaluations),
        val_samples=len(validation),
        ref_acc=ref_acc,
        rule=sc.rule,
        max_cost=max_cost,
        chosen=chosen.subnet,
        chosen_accuracy=chosen.accuracy,
        chosen_cost=chosen.cost,
        cost=sc.cost,
        heuristic_accuracy=heuristic.accuracy,
        heuristic_cost=heuristic.cost,
        workers=sc.workers,
    )


def cached_evaluator(ctx: StageContext, model, space, method, accuracies: AccuracyPool) -> SubnetEvaluator:
    """Scores subnets' validation accuracies with `accuracies` and their cost (`search.cost`) here, persisting
    every evaluation the moment it finishes."""

    def cost(subnet) -> int:
        return method.cost(model, space, subnet, ctx.cfg.search.cost)

    cache_path = ctx.run_dir / ".cache" / f"search-{cache_key(ctx)[:16]}.parquet"
    return SubnetEvaluator(None, cost, cache_path=cache_path, pool=accuracies)


def cache_key(ctx: StageContext) -> str:
    """Evaluations persist outside the stage folder (which appears only when the stage completes), keyed by what an
    accuracy depends on: a killed search resumes from them, and a changed population or budget reuses them."""
    sc = ctx.cfg.search
    return sha256_json(
        {
            "inputs": {k: m.fingerprint() for k, m in ctx.inputs.items()},
            "cost": sc.cost,
            "val_samples": sc.val_samples,
            **({"objective": sc.objective} if sc.objective != "generated" else {}),  # earlier caches stay valid
            "generation": sc.generation.model_dump(),
            "dtype": ctx.cfg.dtype,
        }
    )


def write_evaluations(path, evaluations: list[Evaluation], cost: Callable[[dict, str], int]) -> None:
    """Table 'evaluations': every subnet scored, with both costs, its Pareto flag and label."""
    write_table(
        path,
        "evaluations",
        [
            {
                "eval_id": e.eval_id,
                "config": e.key,
                "accuracy": e.accuracy,
                "params": cost(e.subnet, "params"),
                "macs": cost(e.subnet, "macs"),
                "pareto": e.pareto,
                "label": e.label,
                "seconds": e.seconds,
            }
            for e in evaluations
        ],
    )


def write_progression(path, evaluations: list[Evaluation], cost: str) -> None:
    """Every evaluation in order, as CSV, as the seeds write it."""
    progression = io.StringIO()
    writer = csv.writer(progression)
    writer.writerow(["eval_id", "accuracy", cost, "pareto", "label", "config"])
    writer.writerows([e.eval_id, e.accuracy, e.cost, e.pareto, e.label, e.key] for e in evaluations)
    atomic_write_text(path, progression.getvalue())


if __name__ == "__main__":
    raise SystemExit(main("search", run))
