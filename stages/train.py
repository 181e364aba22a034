"""Stage 2, train: an elastic-rank LoRA super-adapter on the frozen pruned base; every step trains a random subnet.

Writes `train/adapter/` (PEFT format; with train.adapter=nola NOLA's coefficients, seed and shapes),
`train/search_space.json`, `train/training_log.parquet` and
`train/validation.parquet` (the held-out slice the search stage scores subnets on).
With train.heterolora a saliency proxy chooses which LoRA and shortcut modules train, once before training (static)
or every realloc_every of an epoch (dynamic); `train/heterolora.json` is the chosen configuration with its scores,
`train/heterolora_log.parquet` the history, and the adapter holds the enabled modules only.
"""

from __future__ import annotations

import json
import logging
import math
import random

import torch
from peft import LoraConfig, get_peft_model
from torch.nn.utils import parametrize
from tqdm.auto import tqdm
from transformers import DataCollatorForSeq2Seq, get_linear_schedule_with_warmup

from nlsflow.adapters import selection as hetero
from nlsflow.adapters.elastic import activate, maximal_subnet, pattern_key, random_subnet
from nlsflow.adapters.masking import make_sparsity_preserving
from nlsflow.adapters.nola import NolaSpec, basis_floats, make_nola, save_nola
from nlsflow.adapters.shortcuts import attach_shortcuts, decoder_layers
from nlsflow.adapters.supernet import groups_from_config, make_supernet, save_search_space
from nlsflow.adapters.width import WidthGroup
from nlsflow.artifacts import write_table
from nlsflow.data.datasets import check_contamination, load_train_records, split_validation, tokenize_for_training
from nlsflow.errors import NlsflowError
from nlsflow.io import atomic_write_text, folder_bytes
from nlsflow.models import load_causal_lm, load_tokenizer, resolve_device
from stages._common import StageContext, main

log = logging.getLogger(__name__)


def run(ctx: StageContext) -> dict:
    cfg, tc = ctx.cfg, ctx.cfg.train
    device = resolve_device(cfg.device)
    base_dir = str(ctx.input_dir("prune") / "model")
    tokenizer = load_tokenizer(base_dir)
    model = load_causal_lm(base_dir, cfg.dtype, device)

    records = load_train_records(ctx.data_root, cfg.data.train_sets, download=cfg.data.download)
    records, contamination = check_contamination(records, ctx.data_root, mode=cfg.data.contamination)
    train_records, val_records = split_validation(records, tc.val_size, cfg.seed)
    train_records = train_records[: tc.max_train_samples]
    if len(train_records) < tc.batch_size:
        raise NlsflowError(
            f"{len(train_records)} training records left after holding out {len(val_records)}: fewer than "
            f"train.batch_size={tc.batch_size}; lower train.batch_size or train.val_size"
        )
    examples = [tokenize_for_training(tokenizer, r, tc.cutoff_len, tc.train_on_inputs) for r in train_records]

    collate = DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, return_tensors="pt", padding=True)

    def scoring_batches(step: int) -> list[dict]:  # HeteroLoRA's proxies: a fresh, seeded draw each time
        ids = torch.randperm(len(examples), generator=torch.Generator().manual_seed(cfg.seed + step)).tolist()
        size = tc.micro_batch_size
        return [
            collate([examples[j] for j in ids[i * size : (i + 1) * size]]).to(device)
            for i in range(min(hc.batches, len(ids) // size))
        ]

    lora = LoraConfig(
        r=tc.rank, lora_alpha=tc.alpha, lora_dropout=tc.dropout, target_modules=tc.target_modules, task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, lora)
    groups, width_groups = groups_from_config(tc.groups), groups_from_config(tc.width_groups, WidthGroup)
    hc, shortcuts, choice = tc.heterolora, None, None
    if hc.mode != "off" and hc.shortcuts:  # a candidate shortcut across every decoder layer
        shortcuts = attach_shortcuts(model, list(range(len(decoder_layers(model)))), hc.shortcut_rank, tc.alpha)
    if hc.mode == "static":  # choose once on the full candidate set, then build only what was chosen
        cands = hetero.candidates(model, shortcuts)
        choice = hetero.choose(
            model, cands, scoring_batches(0), hc, hetero.candidate_rank_choices(cands, groups), cfg.seed
        )
        log.info("HeteroLoRA (static, %s): %d of %d modules on", hc.proxy, len(choice.enabled), len(cands))
        lora_modules, shortcut_layers = choice.lora_modules(cands), choice.shortcut_layers(cands)
        if shortcuts is not None:
            shortcuts.detach()
        lora = LoraConfig(
            r=tc.rank,
            lora_alpha=tc.alpha,
            lora_dropout=tc.dropout,
            target_modules=lora_modules,
            rank_pattern={pattern_key(n): choice.ranks[n] for n in lora_modules if choice.ranks[n] != tc.rank},
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model.unload(), lora)
        groups = hetero.groups_with_modules(groups, lora_modules)
        shortcuts = attach_shortcuts(model, shortcut_layers, hc.shortcut_rank, tc.alpha) if shortcut_layers else None
    space = make_supernet(model, groups, width_groups)
    if tc.sparsity_preserving:  # the adapter's delta is masked by the base's zeros: merging keeps the sparsity
        log.info("sparsity-preserving LoRA: %d LoRA layers have a sparse base", make_sparsity_preserving(model))
    if tc.adapter == "nola":  # the factors become seeded random-basis combinations: only coefficients train
        nola = NolaSpec(**tc.nola.model_dump(exclude={"max_basis_gb"}))
        basis_gb = basis_floats(model, nola) * next(model.parameters()).element_size() / 1e9
        if basis_gb > tc.nola.max_basis_gb:
            raise NlsflowError(
                f"NOLA bases would take {basis_gb:.1f} GB > train.nola.max_basis_gb={tc.nola.max_basis_gb:g}; "
                "lower train.nola.num_basis_a/num_basis_b, train.rank or train.target_modules"
            )
        log.info("NOLA: %d coefficients replace the LoRA factors", make_nola(model, nola))
    cands = hetero.candidates(model, shortcuts) if hc.mode != "off" else []
    choices = hetero.candidate_rank_choices(cands, groups)
    extra = list(shortcuts.parameters()) if shortcuts is not None else []  # outside the model's module tree
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) + sum(p.numel() for p in extra)

    steps_per_epoch = math.ceil(len(examples) / tc.batch_size)
    total_steps = math.ceil(steps_per_epoch * tc.epochs)
    if tc.max_steps is not None:
        total_steps = min(total_steps, tc.max_steps)
    params = [p for p in model.parameters() if p.requires_grad] + extra
    optimizer = torch.optim.AdamW(params, lr=tc.learning_rate, weight_decay=tc.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, tc.warmup_steps, total_steps)
    rng = random.Random(cfg.seed)
    order_rng = torch.Generator().manual_seed(cfg.seed)

    reselect = (
        hetero.Reselection(model, cands, hc, choices, steps_per_epoch, scoring_batches, cfg.seed)
        if hc.mode == "dynamic"
        else None
    )
    model.train()
    log_rows, recent = [], []
    order: list[int] = []
    for step in tqdm(range(1, total_steps + 1), desc="train", unit="step"):
        if reselect and reselect.due(
            step
        ):  # HeteroLoRA dynamic: every realloc_every of an epoch, at the maximal subnet
            activate(model, space, maximal_subnet(space))
            reselect(step)
        subnet = random_subnet(space, rng)  # the super-network trains one sampled subnet per optimizer step
        activate(model, space, subnet)
        if len(order) < tc.batch_size:  # a new epoch: reshuffle (the remainder of the last one is dropped)
            order = torch.randperm(len(examples), generator=order_rng).tolist()
        batch_ids, order = order[: tc.batch_size], order[tc.batch_size :]
        loss_sum = 0.0
        for i in range(0, tc.batch_size, tc.micro_batch_size):
            batch = collate([examples[j] for j in batch_ids[i : i + tc.micro_batch_size]]).to(device)
            with parametrize.cached():  # NOLA: each factor is recombined once per forward, not at every access
                loss = model(**batch).loss * tc.micro_batch_size / tc.batch_size
                loss.backward()
            loss_sum += loss.item()
        if tc.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
        learning_rate = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        recent.append(loss_sum)
        if step % tc.log_every == 0 or step == total_steps:
            log_rows.append(
                {
                    "step": step,
                    "epoch": step / steps_per_epoch,
                    "loss": sum(recent) / len(recent),
                    "learning_rate": learning_rate,
                    "active_config": json.dumps(subnet),
                }
            )
            recent = []

    hetero_metrics = {}
    if hc.mode != "off":  # the adapter and search space hold the enabled modules only
        choice, hetero_rows = (reselect.choice, reselect.rows) if reselect else (choice, [])
        lora_modules, shortcut_layers = choice.lora_modules(cands), choice.shortcut_layers(cands)
        hetero.save_adapter(model, lora_modules, shortcuts, shortcut_layers, ctx.out_dir / "adapter")
        groups, space = hetero.groups_with_modules(groups, lora_modules), hetero.space_with_modules(space, lora_modules)
        atomic_write_text(
            ctx.out_dir / "heterolora.json",
            json.dumps(
                {**hc.model_dump(), "enabled": sorted(choice.enabled), "ranks": choice.ranks, "scores": choice.scores},
                indent=2,
            ),
        )
        if hetero_rows:
            write_table(ctx.out_dir / "heterolora_log.parquet", "heterolora_log", hetero_rows)
        trainable = sum(c.A.numel() + c.B.numel() for c in cands if c.name in choice.enabled)
        hetero_metrics = {
            "heterolora_enabled": len(choice.enabled),
            "heterolora_candidates": len(choice.scores),
            "heterolora_reallocations": len(hetero_rows),
            "enabled_lora_modules": len(lora_modules),
            "enabled_shortcuts": len(shortcut_layers),
        }
    elif tc.adapter == "nola":
        save_nola(model, nola, ctx.out_dir / "adapter")
    else:
        model.save_pretrained(ctx.out_dir / "adapter")
    adapter_bytes = folder_bytes(ctx.out_dir / "adapter")
    save_search_space(ctx.out_dir / "search_space.json", groups, width_groups, space)
    write_table(ctx.out_dir / "training_log.parquet", "training_log", log_rows)
    write_table(
        ctx.out_dir / "validation.parquet",
        "records",
        [{k: r[k] for k in ("source", "instruction", "input", "output", "answer")} for r in val_records],
    )
    return {
        "steps": total_steps,
        "final_loss": log_rows[-1]["loss"],
        "trainable_params": trainable,
        "adapter": tc.adapter,
        "adapter_bytes": adapter_bytes,
        "train_records": len(train_records),
        "val_records": len(val_records),
        "search_variables": len(space),
        "width_variables": sum(v.kind == "width" for v in space),
        "train_sets": cfg.data.train_sets,
        "contamination": contamination,
        **hetero_metrics,
    }


if __name__ == "__main__":
    raise SystemExit(main("train", run))
