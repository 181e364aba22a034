"""Stage 6, benchmark: the dense base, the pruned base and the extracted model, measured the same way.

Writes `benchmark/results.parquet`. Unstructured sparsity on dense kernels gives no speed-up; the table says what it measured.
"""
from __future__ import annotations

import logging

from nlsflow.measure import measure_in_subprocess
from schemas import write_table
from stages._common import StageContext, main

log = logging.getLogger(__name__)


def run(ctx: StageContext) -> dict:
    cfg, bc = ctx.cfg, ctx.cfg.benchmark
    pruned, extracted = ctx.input_dir("prune") / "model", ctx.input_dir("extract")
    prune_metrics = ctx.inputs["prune"].metrics
    variants = {"dense": (prune_metrics["base_model"], None, prune_metrics.get("base_revision")),
                "pruned": (str(pruned), None, None)}
    if (extracted / "merged").is_dir():
        variants["extracted_merged"] = (str(extracted / "merged"), None, None)
    adapter_base = extracted / "base" if (extracted / "base").is_dir() else pruned  # LoNAS: the narrowed base
    variants["extracted_adapter"] = (str(adapter_base), str(extracted / "adapter"), None)

    rows = []
    for name, (model_dir, adapter_dir, revision) in variants.items():
        result = measure_in_subprocess(model_dir=model_dir, adapter_dir=adapter_dir, dtype=cfg.dtype, device=cfg.device,
                                       prompt_len=bc.prompt_len, new_tokens=bc.new_tokens, batch_size=bc.batch_size,
                                       warmup=bc.warmup, repeats=bc.repeats, num_threads=cfg.num_threads, revision=revision)
        log.info("%s: %s", name, result)
        rows.append({"model": name, **result})
    write_table(ctx.out_dir / "results.parquet", "results", rows)
    by_name = {r["model"]: r for r in rows}
    return {"results": by_name, "settings": bc.model_dump()}


if __name__ == "__main__":
    raise SystemExit(main("benchmark", run))
