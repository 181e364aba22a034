"""Search throughput: subnet evaluations per minute as `search` scores them (evaluation cache + batched generation)
vs no cache, and vs unbatched generation (batch size 1).

One NSGA-II run (`nsga2_search`, the config's population, at most `search_evals` distinct subnets) records the
subnets it asks for, repeats included, and warms the model up; every variant then scores that same sequence.
Evaluations per minute count every requested evaluation, cache hits included. The super-adapter is untrained
(random lora_B), so only the speeds mean something, not the accuracies.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

from bench.context import BenchContext
from bench.runner import alternate, no_worse, row
from nlsflow.adapters.elastic import Subnet, adapter_parameters, linear_macs_per_token
from nlsflow.adapters.supernet import NAMED_SUBNETS
from nlsflow.data.datasets import check_contamination, split_validation
from nlsflow.deploy.timing import median_spread
from nlsflow.errors import NlsflowError
from nlsflow.evaluation.scoring import subnet_accuracy
from nlsflow.search.nsga2 import SubnetEvaluator, nsga2_search


class _Recorder(SubnetEvaluator):
    """A SubnetEvaluator that also lists every subnet it is asked for, in order."""

    def __init__(self, *args):
        super().__init__(*args)
        self.requests: list[Subnet] = []

    def evaluate_many(self, subnets, labels=None):  # every request comes through here, single ones too
        self.requests += [dict(s) for s in subnets]
        return super().evaluate_many(subnets, labels)


def _replay(score, requests: list[Subnet]) -> tuple[float, list[float]]:
    """Score every requested subnet in order: (evaluations per minute, accuracies)."""
    start = time.perf_counter()
    accuracies = [score(subnet) for subnet in requests]
    return len(requests) / (time.perf_counter() - start) * 60, accuracies


def measure(ctx: BenchContext, repeats: int) -> dict:
    """Per variant the (evaluations/min, accuracies) of each round, and the settings they ran under."""
    cfg, sc, s = ctx.cfg, ctx.cfg.search, ctx.settings
    model, space = ctx.supernet(random_b=True, seed=cfg.seed)
    model.eval()
    records, _ = check_contamination(ctx.records, Path(cfg.data.root), mode=cfg.data.contamination)
    _, validation = split_validation(records, cfg.train.val_size, cfg.seed)  # train's held-out slice
    validation = validation[: min(sc.val_samples or len(validation), s.search_records)]
    gen = sc.generation
    new_tokens = min(gen.max_new_tokens, s.search_new_tokens)
    accuracy = partial(
        subnet_accuracy,
        model,
        ctx.tokenizer,
        space,
        validation,
        max_new_tokens=new_tokens,
        num_beams=gen.num_beams,
        progress=False,
    )
    batched, unbatched = partial(accuracy, batch_size=gen.batch_size), partial(accuracy, batch_size=1)
    cost = partial(adapter_parameters if sc.cost == "params" else linear_macs_per_token, model, space)

    recorder = _Recorder(batched, cost)  # also the warm-up
    nsga2_search(
        space,
        recorder,
        population=sc.population,
        num_evals=min(sc.num_evals, s.search_evals),
        seed=cfg.seed,
        seeds={name: fn(space) for name, fn in NAMED_SUBNETS.items()},
    )
    requests = recorder.requests

    def cached(evaluator):
        return lambda subnet: evaluator(subnet).accuracy

    variants = {
        "ours": lambda: _replay(cached(SubnetEvaluator(batched, cost)), requests),
        "no cache": lambda: _replay(batched, requests),
        "unbatched": lambda: _replay(cached(SubnetEvaluator(unbatched, cost)), requests),
    }
    results = alternate(variants, repeats, 0, desc="bench: search (NSGA-II's subnet sequence)")
    return {
        "results": results,
        "requests": len(requests),
        "distinct": len(recorder.evaluations),
        "records": len(validation),
        "new_tokens": new_tokens,
        "batch_size": gen.batch_size,
    }


def run(ctx: BenchContext) -> list[dict]:
    m = measure(ctx, ctx.settings.repeats)
    results = m["results"]
    for (_, ours), (_, uncached) in zip(results["ours"], results["no cache"]):
        if ours != uncached:
            raise NlsflowError("the cached and uncached search runs gave different accuracies; the cache is wrong")
    same_unbatched = all(a == b for (_, a), (_, b) in zip(results["ours"], results["unbatched"]))
    note = (
        f"{m['requests']} requested evaluations counted, cache hits included ({m['distinct']} distinct subnets); "
        f"{m['records']} validation records, {m['new_tokens']} new tokens"
    )
    rate = {name: median_spread([r for r, _ in values]) for name, values in results.items()}
    ours = f"cache + batched generation (batch {m['batch_size']})"
    target = no_worse(lower_is_better=False)
    return [
        row(
            "search throughput",
            ours,
            "no evaluation cache",
            "subnet evaluations per minute",
            "evals/min",
            rate["ours"],
            rate["no cache"],
            ctx.settings.repeats,
            target,
            note + "; same accuracies",
        ),
        row(
            "search throughput",
            ours,
            "unbatched generation (batch 1)",
            "subnet evaluations per minute",
            "evals/min",
            rate["ours"],
            rate["unbatched"],
            ctx.settings.repeats,
            target,
            note + ("; same accuracies" if same_unbatched else "; accuracies differ (left padding changes logits)"),
        ),
    ]
