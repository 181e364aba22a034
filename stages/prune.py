"""Stage 1, prune: Wanda (or magnitude) sparsity on the base model, layer by layer, with perplexity before and after.

Writes `prune/model/` (HF folder, safetensors, with tokenizer) and `prune/sparsity.parquet`.
"""

from __future__ import annotations

import logging

import torch

from nlsflow.adapters.width import reorder_mlp_channels
from nlsflow.artifacts import write_table
from nlsflow.data.datasets import (
    calibration_batch,
    calibration_documents,
    generate_prompt,
    load_train_records,
    wikitext2,
)
from nlsflow.models import load_causal_lm, load_tokenizer, materialize_base_model, resolve_device
from nlsflow.pruning import perplexity, prune_model, sparsity_table
from schemas.outputs import PruneOutput
from stages._common import StageContext, main

log = logging.getLogger(__name__)


def run(ctx: StageContext) -> PruneOutput:
    cfg, pc = ctx.cfg, ctx.cfg.prune
    device = resolve_device(cfg.device)
    base = materialize_base_model(cfg.model, tokenizer_texts(ctx), cfg.seed)
    revision = cfg.model.revision if base == cfg.model.name_or_path else None  # a hub id, loaded as is
    tokenizer = load_tokenizer(base, revision)
    model = load_causal_lm(base, cfg.dtype, device, revision)

    test_ids = perplexity_ids(ctx, tokenizer)
    ppl_dense = perplexity(model, test_ids.to(device), pc.perplexity_seqlen)
    calib = calibration(ctx, tokenizer, device)
    if pc.reorder_mlp_channels:  # before pruning, so that N:M groups are formed in the new channel order
        log.info("reordered the channels of %d MLPs by calibration importance", reorder_mlp_channels(model, calib))
    if pc.sparsity == 0:  # LoNAS: no pruning, the base is passed on dense
        layers, ppl_pruned = sparsity_table(model, pc.targets), ppl_dense
    else:
        layers = prune_model(
            model, calib, method=pc.method, sparsity=pc.sparsity, structure=pc.n_m or "unstructured", targets=pc.targets
        )
        ppl_pruned = perplexity(model, test_ids.to(device), pc.perplexity_seqlen)
    log.info("WikiText-2 perplexity: dense %.2f -> pruned %.2f", ppl_dense, ppl_pruned)

    model.save_pretrained(ctx.out_dir / PruneOutput.files.model)
    tokenizer.save_pretrained(ctx.out_dir / PruneOutput.files.model)
    write_sparsity(ctx.out_dir / PruneOutput.files.sparsity, layers)
    pruned_weights = sum(l.in_features * l.out_features for l in layers)
    params = sum(p.numel() for p in model.parameters())
    return PruneOutput(
        base_model=base,
        base_revision=revision,
        params=params,
        nonzero_params=int(sum((p != 0).sum().item() for p in model.parameters())),
        pruned_layers=len(layers),
        sparsity=sum(l.zeros for l in layers) / max(pruned_weights, 1),
        ppl_dense=ppl_dense,
        ppl_pruned=ppl_pruned,
    )


def tokenizer_texts(ctx: StageContext) -> list[str] | None:
    """The tiny model's tokenizer learns the task's training text and WikiText-2's validation split; None otherwise."""
    cfg, root, download = ctx.cfg, ctx.data_root, ctx.cfg.data.download
    if cfg.model.name_or_path != "tiny":
        return None
    records = load_train_records(root, cfg.data.train_sets, download=download)
    texts = [generate_prompt(r["instruction"], r["input"], r["output"]) for r in records]
    texts += wikitext2(root, "valid", download=download).splitlines()
    return texts


def perplexity_ids(ctx: StageContext, tokenizer) -> torch.Tensor:
    """WikiText-2's test split as token ids, cut to `prune.perplexity_max_windows` windows when set."""
    pc = ctx.cfg.prune
    test_text = wikitext2(ctx.data_root, "test", download=ctx.cfg.data.download)
    test_ids = tokenizer(test_text, return_tensors="pt", add_special_tokens=False, verbose=False).input_ids
    if pc.perplexity_max_windows:
        test_ids = test_ids[:, : pc.perplexity_max_windows * pc.perplexity_seqlen]
    return test_ids


def calibration(ctx: StageContext, tokenizer, device) -> torch.Tensor | None:
    """The calibration batch that pruning and channel reordering score on; None when neither runs."""
    cfg, pc = ctx.cfg, ctx.cfg.prune
    if not (pc.sparsity > 0 or pc.reorder_mlp_channels):
        return None
    cc = pc.calibration
    documents = calibration_documents(
        ctx.data_root,
        cc.source,
        train_names=cfg.data.train_sets,
        contamination=cfg.data.contamination,
        download=cfg.data.download,
    )
    return calibration_batch(tokenizer, documents, cc.num_samples, cc.seqlen, cc.seed).to(device)


def write_sparsity(path, layers) -> None:
    """Table 'sparsity': the zeros of every pruned (or, with sparsity 0, listed) layer."""
    rows = [
        {
            "layer": l.name,
            "in_features": l.in_features,
            "out_features": l.out_features,
            "zeros": l.zeros,
            "sparsity": l.sparsity,
        }
        for l in layers
    ]
    write_table(path, "sparsity", rows)


if __name__ == "__main__":
    raise SystemExit(main("prune", run))
