"""Stage 3, evaluate: the super-adapter's heuristic subnet on the task's test sets (LLM-Adapters protocol).

Writes `evaluate/predictions.parquet`; per-task and average accuracy go into the manifest.
"""
from __future__ import annotations

import logging

from nlsflow.answers import REFERENCE_PROTOCOL
from nlsflow.data import EVAL_DATASETS, load_eval_records
from nlsflow.elastic import activate
from nlsflow.generation import evaluate_dataset
from nlsflow.models import resolve_device
from nlsflow.supernet import NAMED_SUBNETS, load_supernet
from schemas import write_table
from stages._common import StageContext, main

log = logging.getLogger(__name__)


def run(ctx: StageContext) -> dict:
    cfg, ec = ctx.cfg, ctx.cfg.evaluate
    train_dir = ctx.input_dir("train")
    model, tokenizer, space = load_supernet(ctx.input_dir("prune") / "model", train_dir / "adapter",
                                            train_dir / "search_space.json", cfg.dtype, resolve_device(cfg.device))
    subnet = NAMED_SUBNETS[ec.subnet](space)
    activate(model, space, subnet)

    rows, accuracy = [], {}
    for name in ec.datasets:
        records = load_eval_records(ctx.data_root, name, ec.max_samples)
        task_rows = evaluate_dataset(model, tokenizer, EVAL_DATASETS[name], records,
                                     max_new_tokens=ec.generation.max_new_tokens, num_beams=ec.generation.num_beams,
                                     batch_size=ec.generation.batch_size)
        accuracy[name] = sum(r["correct"] for r in task_rows) / len(task_rows)
        log.info("%s: accuracy %.4f on %d records", name, accuracy[name], len(task_rows))
        rows += task_rows
    write_table(ctx.out_dir / "predictions.parquet", "predictions", rows)
    return {"protocol": REFERENCE_PROTOCOL, "subnet_name": ec.subnet, "subnet": subnet, "accuracy": accuracy,
            "average_accuracy": sum(accuracy.values()) / len(accuracy), "samples": len(rows),
            "generation": ec.generation.model_dump()}


if __name__ == "__main__":
    raise SystemExit(main("evaluate", run))
