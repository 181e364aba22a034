"""`make bench`: the tiny bench end to end, and the checks its comparisons rest on (no timing assertions)."""

from __future__ import annotations

import sys

import pytest
import torch

from tests.conftest import DATA_ROOT, needs_data

pytestmark = needs_data
OVERRIDES = [f"data.root={DATA_ROOT}", "num_threads=1"]


@pytest.fixture(scope="module")
def ctx():
    from bench.context import load_context

    return load_context("tiny", OVERRIDES, repeats=1)


@pytest.mark.slow
def test_tiny_bench_writes_the_table(tmp_path):
    from bench.__main__ import main
    from nlsflow.artifacts import read_table

    assert main(["--profile", "tiny", "--repeats", "1", "--out", str(tmp_path), *OVERRIDES]) == 0
    rows = read_table(tmp_path / "bench-tiny.parquet", "bench").to_pylist()  # checks the schema too
    assert [(r["comparison"], r["metric"]) for r in rows] == [
        ("training step", "step time"),
        ("training step", "step time"),
        ("training loop", "step time"),
        ("processes", "step time"),
        ("checkpoint", "save time"),
        ("checkpoint", "size on disk"),
        ("Wanda pruning", "wall time"),
        ("Wanda pruning", "peak RSS above the loaded model"),
        ("search throughput", "subnet evaluations per minute"),
        ("search throughput", "subnet evaluations per minute"),
        ("generation", "tokens per second"),
        ("generation", "tokens per second"),
        ("scoring workers", "subnet evaluations per minute"),
        ("scoring workers", "pool start time"),
        ("scoring workers", "seconds saved per evaluation vs spent"),
    ]
    for r in rows:
        assert r["profile"] == "tiny" and r["repeats"] == 1 and r["ours_spread"] == r["peer_spread"] == 0
        assert r["ours_median"] > 0 and r["peer_median"] > 0
        assert r["ratio"] == pytest.approx(r["ours_median"] / r["peer_median"])
        measured_only = r["comparison"] in ("processes", "checkpoint") or (
            r["comparison"] == "scoring workers" and r["metric"] != "subnet evaluations per minute"
        )  # reported as measured: no target
        assert bool(r["target"]) != measured_only and isinstance(r["target_met"], bool) != measured_only
    assert "cannot show GPU scaling" in rows[3]["note"]
    assert "identical masks in all 14 linears" in rows[6]["note"]
    assert "greedy tokens identical" in rows[10]["note"]
    md = (tmp_path / "bench-tiny.md").read_text()
    assert md.count("\n| ") == 1 + len(rows) and "Wanda pruning" in md


def test_the_plain_loop_trains_what_train_supernet_trains(ctx):
    """The training-loop row's peer does the same work: from the same weights, the same log and weights, bit for
    bit (accelerate on 1 process adds no numerical change)."""
    from bench.accelerate_loop import build, plain_train
    from nlsflow.methods import method_for
    from nlsflow.training import train_supernet

    cfg = ctx.cfg
    tc = cfg.train.model_copy(update={"max_steps": 3, "log_every": 1})
    method = method_for(cfg)
    records = ctx.records[: tc.batch_size * 3]
    (plain, data), (accelerated, _) = (build(cfg, method, ctx.base_dir, None, records, ctx.device) for _ in range(2))

    def trained(net) -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in net.model.named_parameters() if p.requires_grad}

    start = trained(plain)
    assert all(torch.equal(start[name], p) for name, p in trained(accelerated).items())
    plain_log = plain_train(method, plain, data, tc, cfg.seed).log_rows
    assert len(plain_log) == 3 and plain_log == train_supernet(method, accelerated, data, tc, cfg.seed).log_rows
    after = trained(plain)
    assert all(torch.equal(after[name], p) for name, p in trained(accelerated).items())
    assert not all(torch.equal(after[name], p) for name, p in start.items())  # the steps did train


def test_a_failed_or_stuck_worker_is_one_line():
    from bench.accelerate_loop import run_worker
    from nlsflow.errors import NlsflowError

    with pytest.raises(NlsflowError, match=r"failed \(exit 3\): boom \(disk full\)$"):
        run_worker([sys.executable, "-c", "print('noise'); print('rank 1 failed: boom (disk full)'); exit(3)"])
    with pytest.raises(NlsflowError, match="ran over 1 s"):
        run_worker([sys.executable, "-c", "import time; time.sleep(60)"], timeout=1)


def test_wanda_masks_are_compared(ctx):
    from bench.wanda import calibration_ids, check_same_masks, prune_once
    from nlsflow.errors import NlsflowError

    calib = calibration_ids(ctx)

    def masks(impl, sparsity, n_m=None):
        return prune_once(impl, ctx.base_dir, "float32", "cpu", calib, sparsity, n_m, 1)["masks"]

    ours = masks("ours", 0.5)
    assert len(ours) == 14
    check_same_masks(ours, masks("reference", 0.5))
    check_same_masks(masks("ours", 0.5, (2, 4)), masks("reference", 0.5, (2, 4)))
    with pytest.raises(NlsflowError, match="masks differ .* in 14 of 14 linears"):
        check_same_masks(ours, masks("reference", 0.6))
    with pytest.raises(NlsflowError, match="in 14 of 14 linears"):
        check_same_masks(ours, masks("reference", 0.5, (2, 4)))


@pytest.mark.slow
def test_search_cached_and_uncached_give_the_same_accuracies(ctx):
    from bench.search import measure

    m = measure(ctx, repeats=1)
    ((_, ours),) = m["results"]["ours"]
    ((_, uncached),) = m["results"]["no cache"]
    assert len(ours) == m["requests"] > m["distinct"]  # NSGA-II asked for some subnets again: the cache answered
    assert ours == uncached
    assert len(set(ours)) > 1  # the subnets really score differently, so equal lists mean something


def test_merged_greedy_tokens_equal_the_unmerged(ctx):
    from bench.generation import greedy_tokens, models

    variants = models(ctx)
    ids = torch.randint(4, variants["base"].config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(1))
    merged = greedy_tokens(variants["merged"], ids, 16)
    assert merged.shape == (1, 16)
    assert torch.equal(merged, greedy_tokens(variants["unmerged"], ids, 16))
    with torch.no_grad():  # the adapter does change the model, so the equality is not the base's own tokens
        assert not torch.equal(variants["merged"](ids).logits, variants["base"](ids).logits)


def test_workers_sample_distinct_seeded_subnets():
    from bench.workers import sample_subnets
    from nlsflow.adapters.elastic import Variable

    space = [Variable("qkv", ("q",), (8, 6, 4)), Variable("up", ("u",), (8, 4))]
    subnets = sample_subnets(space, 4, seed=3)
    assert subnets == sample_subnets(space, 4, seed=3) and len({tuple(s.items()) for s in subnets}) == 4
    assert len(sample_subnets(space, 100, seed=3)) == 6  # no more than the space holds


@pytest.mark.slow
def test_workers_rows_from_two_ray_workers_and_one_in_process(ctx):
    """The `workers` comparison on a local Ray cluster of 2 workers (one round, no warm-up): its three rows, the
    threads each side really scored with, and Ray shut down after."""
    from dataclasses import replace

    import ray

    from bench.workers import run

    rows = run(replace(ctx, settings=replace(ctx.settings, warmup=0)))
    assert [(r["comparison"], r["metric"]) for r in rows] == [
        ("scoring workers", "subnet evaluations per minute"),
        ("scoring workers", "pool start time"),
        ("scoring workers", "seconds saved per evaluation vs spent"),
    ]
    for r in rows:
        assert r["ours_median"] > 0 and r["peer_median"] > 0 and r["repeats"] == 1
        assert r["ratio"] == pytest.approx(r["ours_median"] / r["peer_median"])
    assert rows[0]["target"] == "ratio ≥ 1.3" and isinstance(rows[0]["target_met"], bool)
    assert rows[1]["target"] == rows[2]["target"] == "" and rows[1]["target_met"] is rows[2]["target_met"] is None
    assert "1 in each Ray worker, 2 in-process" in rows[0]["note"] and "8 distinct seeded subnets" in rows[0]["note"]
    assert "accuracies" in rows[0]["note"]  # same or differing, the bench says which (float sums vary by threads)
    assert not ray.is_initialized()
