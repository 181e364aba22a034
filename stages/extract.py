"""Stage 5, extract: the chosen subnet as a clean PEFT adapter (optionally merged), checked against the super-network.

Writes `extract/adapter/` (stock PEFT: per-module rank_pattern/alpha_pattern, loads with no nlsflow code),
with `extract.merge` `extract/merged/` (HF folder), and with `extract.evaluate` `extract/predictions.parquet`
(the extracted model on the test sets). The max |logit difference| and accuracies go into the manifest.
A NOLA super-adapter is materialized first, so `extract/adapter/` is stock LoRA; `extract/nola/` keeps its
compact form (coefficients, seed, shapes, and the subnet's ranks in subnet.json).
With elastic base width (LoNAS) the inactive MLP channels are cut out: `extract/base/` is the narrowed base the
adapter belongs to, and `extract/merged/` is narrowed too (a stock HF folder when every layer has one width,
else `per_layer_llama` with its code in the folder).
"""

from __future__ import annotations

import json
import logging
import shutil

import torch
from peft import PeftModel

from nlsflow.adapters.elastic import activate, extract_sub_adapter, validate_subnet
from nlsflow.adapters.masking import make_sparsity_preserving, masked_merge, require_sparsity
from nlsflow.adapters.nola import is_nola
from nlsflow.adapters.shortcuts import copy_shortcuts, has_shortcuts, load_shortcuts
from nlsflow.adapters.supernet import NAMED_SUBNETS, load_supernet
from nlsflow.adapters.width import narrow_model, save_narrowed
from nlsflow.artifacts import read_table, write_table
from nlsflow.data.datasets import generate_prompt
from nlsflow.errors import NlsflowError
from nlsflow.evaluation.scoring import evaluate_test_sets
from nlsflow.io import folder_bytes
from nlsflow.models import DTYPES, load_causal_lm, resolve_device
from nlsflow.pruning import sparsity_table
from stages._common import StageContext, main

log = logging.getLogger(__name__)
PROBE_RECORDS = 8
CHECK_DTYPE = (
    "float32"  # the equivalence check runs in float32 whatever the run's dtype: bf16 kernels differ in rounding
)


@torch.inference_mode()
def logits(model, batch) -> torch.Tensor:
    out = model(**batch).logits.float()
    return out[batch["attention_mask"].bool()]  # compare real tokens only


def load_extracted(base_dir, adapter_dir, dtype: str, device, sparse: bool):
    """The extracted adapter on its base with stock PEFT, plus its mask (Shears) and shortcuts (HeteroLoRA)."""
    sub = PeftModel.from_pretrained(load_causal_lm(str(base_dir), dtype, device), str(adapter_dir)).eval()
    if sparse:  # a stock adapter reproduces the masked super-network only with the mask: deploy extract/merged/
        make_sparsity_preserving(sub)
    return sub, load_shortcuts(sub, adapter_dir)


def run(ctx: StageContext) -> dict:
    cfg, xc = ctx.cfg, ctx.cfg.extract
    device = resolve_device(cfg.device)
    base_dir, train_dir = ctx.input_dir("prune") / "model", ctx.input_dir("train")
    sparse = cfg.train.sparsity_preserving
    model, tokenizer, space = load_supernet(
        base_dir, train_dir / "adapter", train_dir / "search_space.json", CHECK_DTYPE, device, sparse
    )
    if isinstance(xc.subnet, dict):
        subnet, subnet_name = xc.subnet, "given"
    elif xc.subnet == "searched":
        subnet, subnet_name = json.loads((ctx.input_dir("search") / "chosen.json").read_text()), xc.subnet
    else:
        subnet, subnet_name = NAMED_SUBNETS[xc.subnet](space), xc.subnet
    try:
        validate_subnet(space, subnet)
    except ValueError as e:
        raise NlsflowError(f"extract.subnet: {e}; see train/search_space.json for the variables and choices") from None
    activate(model, space, subnet)

    probe = read_table(train_dir / "validation.parquet", "records").to_pylist()[:PROBE_RECORDS]
    prompts = [generate_prompt(r["instruction"], r["input"], r["output"]) for r in probe]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, truncation=True, max_length=256).to(device)
    expected = logits(model, batch)

    adapter_dir, sizes = ctx.out_dir / "adapter", []
    if any(v.kind == "width" for v in space):  # LoNAS: the sub-adapter belongs to the base without the cut channels
        narrow = load_causal_lm(str(base_dir), cfg.dtype, torch.device("cpu"))  # slicing only: keep the GPU free
        sizes = narrow_model(narrow, space, subnet)
        base_dir = ctx.out_dir / "base"
        save_narrowed(narrow, sizes, base_dir)
        tokenizer.save_pretrained(base_dir)
        del narrow
    extract_sub_adapter(
        model,
        space,
        subnet,
        adapter_dir,
        base_model_name_or_path=str(ctx.input_dir("extract") / "base") if sizes else None,
    )
    with_shortcuts = has_shortcuts(train_dir / "adapter")  # HeteroLoRA: not mergeable, they travel as files
    if with_shortcuts:
        copy_shortcuts(train_dir / "adapter", adapter_dir)
    del model
    sub, shortcut_modules = load_extracted(base_dir, adapter_dir, CHECK_DTYPE, device, sparse)
    shortcut_params = sum(p.numel() for p in shortcut_modules.parameters()) if shortcut_modules else 0
    diff = (logits(sub, batch) - expected).abs().max().item()
    log.info("extracted adapter vs super-network subnet: max |Δlogit| = %.3g", diff)
    if diff > xc.tolerance:
        raise NlsflowError(
            f"extracted adapter differs from the super-network by {diff:.3g} > extract.tolerance="
            f"{xc.tolerance:g}; this is a bug, please report it with {adapter_dir}"
        )
    metrics = {
        "subnet_name": subnet_name,
        "subnet": subnet,
        "max_abs_logit_diff": diff,
        "check_dtype": CHECK_DTYPE,
        "adapter_params": sum(p.numel() for n, p in sub.named_parameters() if "lora_" in n) + shortcut_params,
        "base_params": sum(p.numel() for n, p in sub.named_parameters() if "lora_" not in n),
        "shortcuts": with_shortcuts,
    }
    if sizes:
        metrics["mlp_widths"] = sizes
    metrics["adapter_bytes"] = folder_bytes(adapter_dir)
    if is_nola(train_dir / "adapter"):  # NOLA's compact form: the coefficients, and the ranks to slice the factors to
        shutil.copytree(train_dir / "adapter", ctx.out_dir / "nola")
        (ctx.out_dir / "nola" / "subnet.json").write_text(json.dumps(subnet, indent=2))
        metrics["nola_bytes"] = folder_bytes(ctx.out_dir / "nola")
    if xc.merge:
        merged = masked_merge(sub) if sparse else sub.merge_and_unload()
        merged_diff = (logits(merged, batch) - expected).abs().max().item()
        if merged_diff > xc.merge_tolerance:
            raise NlsflowError(
                f"merged model differs from the super-network by {merged_diff:.3g} > extract.merge_tolerance="
                f"{xc.merge_tolerance:g}; set extract.merge=false to keep the adapter only"
            )
        if sparse:  # fails loudly, naming the first layer that lost zeros
            pruned = read_table(ctx.input_dir("prune") / "sparsity.parquet", "sparsity").to_pylist()
            require_sparsity(merged, {r["layer"]: r["zeros"] for r in pruned})
        metrics["merged_max_abs_logit_diff"] = merged_diff
        layers = sparsity_table(merged)
        metrics["merged_sparsity"] = sum(l.zeros for l in layers) / sum(l.in_features * l.out_features for l in layers)
        metrics["merged_params"] = sum(p.numel() for p in merged.parameters()) + shortcut_params
        save_narrowed(merged.to(DTYPES[cfg.dtype]), sizes, ctx.out_dir / "merged")
        tokenizer.save_pretrained(ctx.out_dir / "merged")
        if with_shortcuts:
            copy_shortcuts(adapter_dir, ctx.out_dir / "merged")
        del merged
    if xc.evaluate:  # the deployable model, loaded with stock PEFT, on the test sets
        sub, _ = load_extracted(base_dir, adapter_dir, cfg.dtype, device, sparse)
        rows, scores = evaluate_test_sets(sub, tokenizer, ctx.data_root, ctx.cfg.evaluate, "extracted")
        write_table(ctx.out_dir / "predictions.parquet", "predictions", rows)
        metrics.update(scores)
    return metrics


if __name__ == "__main__":
    raise SystemExit(main("extract", run))
