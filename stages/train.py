"""Stage 2, train: the method's super-adapter on the frozen pruned base; every step trains a random subnet.

Writes `train/adapter/` (PEFT format; NOLA: its coefficients, seed and shapes), `train/search_space.json`,
`train/training_log.parquet` and `train/validation.parquet` (the held-out slice the search scores subnets on),
plus what the method keeps of its own (HeteroLoRA: `heterolora.json`, `heterolora_log.parquet`).
"""

from __future__ import annotations

from nlsflow.artifacts import write_table
from nlsflow.io import folder_bytes
from nlsflow.methods import method_for
from nlsflow.models import load_causal_lm, load_tokenizer, resolve_device
from nlsflow.training import TrainingData, split_records, train_supernet
from schemas.outputs import PruneOutput, TrainOutput
from stages._common import StageContext, main

VALIDATION_COLUMNS = ("source", "instruction", "input", "output", "answer")


def run(ctx: StageContext) -> TrainOutput:
    cfg = ctx.cfg
    device = resolve_device(cfg.device)
    base_dir, files = str(ctx.input_dir("prune") / PruneOutput.files.model), TrainOutput.files
    tokenizer, model = load_tokenizer(base_dir), load_causal_lm(base_dir, cfg.dtype, device)
    train_records, val_records, contamination = split_records(cfg, ctx.data_root)
    data = TrainingData.prepare(train_records, tokenizer, cfg.train, cfg.seed, device)

    method = method_for(cfg)
    net = method.build(model, data.scoring_batches)
    result = train_supernet(method, net, data, cfg.train, cfg.seed)

    method_metrics = method.save(net, ctx.out_dir)
    write_table(ctx.out_dir / files.training_log, "training_log", result.log_rows)
    validation = [{k: r[k] for k in VALIDATION_COLUMNS} for r in val_records]
    write_table(ctx.out_dir / files.validation, "records", validation)
    return TrainOutput(
        steps=result.steps,
        final_loss=result.final_loss,
        trainable_params=method.trainable_count(net),
        adapter=method.adapter_kind,
        adapter_bytes=folder_bytes(ctx.out_dir / files.adapter),
        train_records=len(train_records),
        val_records=len(val_records),
        search_variables=len(net.space),
        width_variables=sum(v.kind == "width" for v in net.space),
        train_sets=cfg.data.train_sets,
        contamination=contamination,
        **method_metrics,
    )


if __name__ == "__main__":
    raise SystemExit(main("train", run))
