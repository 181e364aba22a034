"""Stage 3, evaluate: the super-adapter's heuristic subnet on the task's test sets, under both scoring protocols.

Writes `evaluate/predictions.parquet`; per-task and average accuracy (LLM-Adapters reference rules and the strict
rules) go into the manifest. With `evaluate.baselines`, the dense and/or pruned base without adapter are scored too.
With `evaluate.workers` > 1 the test sets are scored in shards by Ray workers (`nlsflow.cluster`); the predictions
are the same, in the same order.
"""

from __future__ import annotations

import logging
from functools import partial
from itertools import combinations

from nlsflow.artifacts import read_json, write_table
from nlsflow.cluster import scoring_pool
from nlsflow.evaluation.answers import REFERENCE_PROTOCOL, STRICT_PROTOCOL
from nlsflow.evaluation.scoring import paired_differences, score_test_sets
from nlsflow.evaluation.workers import AtSubnet, BaseModelLoad, SupernetLoad, TestSetScorer
from nlsflow.models import load_tokenizer
from schemas.files import SearchSpaceFile
from schemas.outputs import EvaluateOutput, PruneOutput, TrainOutput
from stages._common import StageContext, main

log = logging.getLogger(__name__)


def run(ctx: StageContext) -> EvaluateOutput:
    cfg, ec = ctx.cfg, ctx.cfg.evaluate
    train_dir = ctx.input_dir("train")
    base_dir = ctx.input_dir("prune") / PruneOutput.files.model
    subnet = read_json(train_dir / TrainOutput.files.search_space, SearchSpaceFile, "train").subnets[ec.subnet]
    models = {"supernet": AtSubnet(SupernetLoad(cfg, base_dir, train_dir), subnet)}
    if "dense" in ec.baselines:
        prune = ctx.output("prune")
        models["dense"] = BaseModelLoad(prune.base_model, cfg.dtype, cfg.device, prune.base_revision)
    tokenizer = load_tokenizer(str(base_dir))  # the shards' batches are cut by prompt length

    baselines = {}  # name -> scores, as score_test_sets returns them
    with scoring_pool(TestSetScorer(models, ec.generation), ec.workers, cfg.cluster, cfg.device) as pool:
        score = partial(score_test_sets, pool, tokenizer, ctx.data_root, ec)
        rows, scores = score(ec.subnet, "supernet")
        if "pruned" in ec.baselines:  # the pruned base alone (no LoRA, no HeteroLoRA shortcuts)
            pruned_rows, baselines["pruned"] = score("pruned", "supernet", adapter_off=True)
            rows += pruned_rows
        if "dense" in ec.baselines:  # each worker drops the super-network for the dense base
            dense_tokenizer = load_tokenizer(prune.base_model, prune.base_revision)  # its batches, as it cuts them
            dense_rows, baselines["dense"] = score_test_sets(pool, dense_tokenizer, ctx.data_root, ec, "dense", "dense")
            rows += dense_rows
    write_table(ctx.out_dir / EvaluateOutput.files.predictions, "predictions", rows)
    scored = [m for m in (ec.subnet, "pruned", "dense") if m == ec.subnet or m in baselines]  # each above the next
    pairs = list(combinations(scored, 2))
    differences = paired_differences(rows, pairs, ec.averaged)
    cloze = "average_accuracy_cloze" in scores  # multiple choice: by lm-eval's cloze as well
    differences_cloze = paired_differences(rows, pairs, ec.averaged, "cloze_correct") if cloze else {}
    return EvaluateOutput(
        protocols=[REFERENCE_PROTOCOL, STRICT_PROTOCOL],
        subnet_name=ec.subnet,
        subnet=subnet,
        **scores,
        baselines=baselines,
        differences=differences,
        differences_cloze=differences_cloze,
        samples=len(rows),
        generation=ec.generation,
        workers=ec.workers,
    )


if __name__ == "__main__":
    raise SystemExit(main("evaluate", run))
