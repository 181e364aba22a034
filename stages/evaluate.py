"""Stage 3, evaluate: the super-adapter's heuristic subnet on the task's test sets, under both scoring protocols.

Writes `evaluate/predictions.parquet`; per-task and average accuracy (LLM-Adapters reference rules and the strict
rules) go into the manifest. With `evaluate.baselines`, the dense and/or pruned base without adapter are scored too.
"""

from __future__ import annotations

import logging

from nlsflow.adapters.elastic import activate
from nlsflow.adapters.shortcuts import shortcuts_off
from nlsflow.adapters.supernet import NAMED_SUBNETS
from nlsflow.artifacts import write_table
from nlsflow.evaluation.answers import REFERENCE_PROTOCOL, STRICT_PROTOCOL
from nlsflow.evaluation.scoring import evaluate_test_sets
from nlsflow.methods import method_for
from nlsflow.models import load_causal_lm, load_tokenizer, resolve_device
from schemas.outputs import EvaluateOutput, PruneOutput
from stages._common import StageContext, main

log = logging.getLogger(__name__)


def run(ctx: StageContext) -> EvaluateOutput:
    cfg, ec = ctx.cfg, ctx.cfg.evaluate
    device = resolve_device(cfg.device)
    train_dir = ctx.input_dir("train")
    model, tokenizer, space = method_for(cfg).load(
        ctx.input_dir("prune") / PruneOutput.files.model, train_dir, cfg.dtype, device
    )
    subnet = NAMED_SUBNETS[ec.subnet](space)
    activate(model, space, subnet)
    rows, scores = evaluate_test_sets(model, tokenizer, ctx.data_root, ec, ec.subnet)

    baselines = {}  # name -> scores, as evaluate_test_sets returns them
    if "pruned" in ec.baselines:
        with model.disable_adapter(), shortcuts_off(model):  # the pruned base alone (no LoRA, no HeteroLoRA shortcuts)
            pruned_rows, baselines["pruned"] = evaluate_test_sets(model, tokenizer, ctx.data_root, ec, "pruned")
        rows += pruned_rows
    if "dense" in ec.baselines:
        del model
        prune = ctx.output("prune")
        dense = load_causal_lm(prune.base_model, cfg.dtype, device, prune.base_revision)
        dense_rows, baselines["dense"] = evaluate_test_sets(
            dense, load_tokenizer(prune.base_model, prune.base_revision), ctx.data_root, ec, "dense"
        )
        rows += dense_rows
    write_table(ctx.out_dir / EvaluateOutput.files.predictions, "predictions", rows)
    return EvaluateOutput(
        protocols=[REFERENCE_PROTOCOL, STRICT_PROTOCOL],
        subnet_name=ec.subnet,
        subnet=subnet,
        **scores,
        baselines=baselines,
        samples=len(rows),
        generation=ec.generation,
    )


if __name__ == "__main__":
    raise SystemExit(main("evaluate", run))
