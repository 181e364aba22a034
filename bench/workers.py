"""Scoring workers: subnet evaluations per minute on 2 resident Ray workers of 1 thread each vs 1 worker of 2 threads
in this process (`nlsflow.cluster`, as `search.workers` scores), what starting the pool costs, and the model load
the resident workers save on every evaluation.

Both pools score the same seeded list of distinct subnets (4 per Ray worker) on the same validation records with
the same generation settings (capped as `bench.search` caps them), on the profile's super-network built as
`bench.search` builds it (`ctx.supernet(random_b=True)`, seeded: every worker builds the same one). Only the scoring
is timed, the pools already started and their models loaded; the Ray pool stays up across rounds. The super-adapter
is untrained (random lora_B), so only the speeds mean something, not the accuracies.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch

from bench.context import BenchContext
from bench.runner import Target, alternate, row
from nlsflow.adapters.elastic import Subnet, Variable
from nlsflow.cluster import LocalPool, ray_pool
from nlsflow.data.datasets import check_contamination, split_validation
from nlsflow.deploy.timing import median_spread
from nlsflow.evaluation.scoring import subnet_accuracy
from nlsflow.models import load_tokenizer

WORKERS = 2  # Ray workers of 1 thread each; the in-process peer gets WORKERS threads
SUBNETS_PER_WORKER = 4
# 2 workers on 2 cores: the real target, >= 0.8 W x for W GPUs (one worker each), needs a GPU host
SPEEDUP_TARGET = 1.3


@dataclass(frozen=True)
class SupernetScorer:
    """What each worker loads (picklable: Ray ships it): the bench's seeded super-network and tokenizer, loaded
    where it runs, answering a subnet with (validation accuracy, torch threads it was scored with)."""

    ctx: BenchContext  # without tokenizer and records: each worker loads its own tokenizer
    validation: list[dict]
    max_new_tokens: int
    num_beams: int
    batch_size: int

    def load(self):
        """(model, tokenizer, space): the super-network as `bench.search` builds it (seeded by the config)."""
        tokenizer = load_tokenizer(self.ctx.base_dir, self.ctx.revision)
        model, space = replace(self.ctx, tokenizer=tokenizer).supernet(random_b=True, seed=self.ctx.cfg.seed)
        return model.eval(), tokenizer, space

    def scorer(self, model, tokenizer, space):
        accuracy = partial(
            subnet_accuracy,
            model,
            tokenizer,
            space,
            self.validation,
            max_new_tokens=self.max_new_tokens,
            num_beams=self.num_beams,
            batch_size=self.batch_size,
            progress=False,
        )
        return lambda subnet: (accuracy(subnet), torch.get_num_threads())

    def __call__(self):
        return self.scorer(*self.load())


def sample_subnets(space: list[Variable], count: int, seed: int) -> list[Subnet]:
    """`count` distinct subnets (fewer if the space has fewer), drawn with a seeded generator over the choices."""
    count = min(count, math.prod(len(v.choices) for v in space))
    rng, seen, subnets = np.random.default_rng(seed), set(), []
    while len(subnets) < count:
        subnet = {v.name: int(rng.choice(v.choices)) for v in space}
        if tuple(subnet.values()) not in seen:
            seen.add(tuple(subnet.values()))
            subnets.append(subnet)
    return subnets


def _score_all(pool, subnets: list[Subnet]) -> dict:
    """Every subnet through `pool`: evaluations per minute, accuracies and threads in the subnets' order, and the
    seconds each evaluation took where it ran."""
    results: list = [None] * len(subnets)
    seconds: list[float] = []
    start = time.perf_counter()
    for index, result, took in pool(subnets):
        results[index] = result
        seconds.append(took)
    per_minute = len(subnets) / (time.perf_counter() - start) * 60
    return {
        "per_minute": per_minute,
        "accuracies": [a for a, _ in results],
        "threads": sorted({t for _, t in results}),
        "seconds": sum(seconds) / len(seconds),
    }


def _threads(runs: list[dict]) -> str:
    return "/".join(str(t) for t in sorted({t for r in runs for t in r["threads"]}))


def validation_records(ctx: BenchContext) -> list[dict]:
    """The search's validation slice, capped as `bench.search` caps it."""
    cfg, sc = ctx.cfg, ctx.cfg.search
    records, _ = check_contamination(ctx.records, Path(cfg.data.root), mode=cfg.data.contamination)
    _, validation = split_validation(records, cfg.train.val_size, cfg.seed)  # train's held-out slice
    return validation[: min(sc.val_samples or len(validation), ctx.settings.search_records)]


def measure(ctx: BenchContext, repeats: int, warmup: int) -> dict:
    """Per variant ("ray", "local") each round's `_score_all`, the pool start and load seconds, and the settings."""
    cfg, gen = ctx.cfg, ctx.cfg.search.generation
    validation = validation_records(ctx)
    new_tokens = min(gen.max_new_tokens, ctx.settings.search_new_tokens)
    scorer = SupernetScorer(
        replace(ctx, tokenizer=None, records=[]), validation, new_tokens, gen.num_beams, gen.batch_size
    )

    local_threads, start = torch.get_num_threads(), time.perf_counter()
    model, tokenizer, space = scorer.load()  # in this process, with its threads
    local_load = time.perf_counter() - start
    local = LocalPool(lambda: scorer.scorer(model, tokenizer, space))
    subnets = sample_subnets(space, SUBNETS_PER_WORKER * WORKERS, cfg.seed)

    def on_local() -> dict:
        before = torch.get_num_threads()
        torch.set_num_threads(WORKERS)
        try:
            return _score_all(local, subnets)
        finally:
            torch.set_num_threads(before)

    start = time.perf_counter()
    with ray_pool(scorer, WORKERS, cpus_per_worker=1, gpus_per_worker=None, device=cfg.device) as pool:
        pool_start = time.perf_counter() - start
        results = alternate(
            {"ray": lambda: _score_all(pool, subnets), "local": on_local},
            repeats,
            warmup,
            desc=f"bench: workers ({WORKERS} Ray workers vs 1 in-process)",
        )
        load_seconds = list(pool.load_seconds)
    return {
        "results": results,
        "pool_start": pool_start,
        "local_load": local_load,
        "local_load_threads": local_threads,
        "load_seconds": load_seconds,
        "subnets": len(subnets),
        "records": len(validation),
        "new_tokens": new_tokens,
        "batch_size": gen.batch_size,
    }


def run(ctx: BenchContext) -> list[dict]:
    s = ctx.settings
    m = measure(ctx, s.repeats, s.warmup)
    ray_runs, local_runs = m["results"]["ray"], m["results"]["local"]
    pairs = [pair for r, p in zip(ray_runs, local_runs) for pair in zip(r["accuracies"], p["accuracies"])]
    differ = sum(a != b for a, b in pairs)
    compared = len(pairs)
    distinct = len({a for r in ray_runs + local_runs for a in r["accuracies"]})
    agreement = (
        f"same accuracies in all {compared} evaluations ({distinct} distinct values)"
        if not differ
        else f"ACCURACIES DIFFER in {differ} of {compared} evaluations (thread counts sum floats differently)"
    )
    setup = (
        f"{m['subnets']} distinct seeded subnets per round, {m['records']} validation records, {m['new_tokens']} new "
        f"tokens, batch {m['batch_size']}; scoring timed with the pool started and the models loaded"
    )
    scaling = (
        f"{len(os.sched_getaffinity(0))} CPU cores: the real target, ≥ 0.8·W× for W GPUs, needs a GPU host; "
        if ctx.device.type == "cpu"
        else ""
    )
    ours, peer = f"{WORKERS} Ray workers × 1 thread", f"1 worker × {WORKERS} threads (in-process)"
    target = Target(f"ratio ≥ {SPEEDUP_TARGET:g}", lambda o, p: o[0] / p[0] >= SPEEDUP_TARGET)
    per_eval = median_spread([r["seconds"] for r in ray_runs])
    load = (sum(m["load_seconds"]) / len(m["load_seconds"]), 0.0)
    return [
        row(
            "scoring workers",
            ours,
            peer,
            "subnet evaluations per minute",
            "evals/min",
            median_spread([r["per_minute"] for r in ray_runs]),
            median_spread([r["per_minute"] for r in local_runs]),
            s.repeats,
            target,
            f"{scaling}{setup}; torch threads seen while scoring: {_threads(ray_runs)} in each Ray worker, "
            f"{_threads(local_runs)} in-process; {agreement}",
        ),
        row(
            "scoring workers",
            f"start {WORKERS} Ray workers (local Ray cluster, each loads the model)",
            "load the model in this process",
            "pool start time",
            "s",
            (m["pool_start"], 0.0),
            (m["local_load"], 0.0),
            1,
            note=(
                "seconds from entering ray_pool to all workers ready: Ray's start, the workers' start and imports, "
                f"and their model loads (each on 1 thread, concurrently) vs one load here ({m['local_load_threads']} "
                "threads); measured once"
            ),
        ),
        row(
            "scoring workers",
            "model load, once per resident Ray worker",
            "scoring one subnet on a Ray worker",
            "seconds saved per evaluation vs spent",
            "s",
            load,
            per_eval,
            s.repeats,
            note=(
                f"the mean of the {WORKERS} workers' model loads ({', '.join(f'{x:.3g}' for x in m['load_seconds'])}"
                " s, timed in each worker: what a worker that loaded the model for every evaluation would add to "
                "each) vs the mean seconds per evaluation in the workers (median ± half range over rounds); such a "
                f"worker would take {1 + load[0] / per_eval[0]:.2f}× as long per evaluation"
            ),
        ),
    ]
