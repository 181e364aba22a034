"""Stage 5, extract: the chosen subnet as deployable folders, each checked against the super-network.

The method decides what it writes (`Method.extract`, `Method.merge`): a stock PEFT sub-adapter at
`extract/adapter/` (per-module rank_pattern/alpha_pattern) and with `extract.merge` the merged model at
`extract/merged/`; Shears' masked sub-adapter at `extract/masked_adapter/` (it needs the base's mask, so its merged
model is what deploys); LoNAS's narrowed base at `extract/base/`; NOLA's compact form at `extract/nola/`. Every
folder is loaded as a user would and its logits compared with the super-network's at the subnet (float32): the
stage fails naming the one that differs. With `extract.evaluate` the deployable one is scored on the test sets
(`extract/predictions.parquet`). Every folder gets a model card, its README.md (`nlsflow.deploy.card`).
"""

from __future__ import annotations

import gc
import logging
from collections import Counter
from pathlib import Path

import torch

from nlsflow.adapters.elastic import activate, validate_subnet
from nlsflow.adapters.shortcuts import attached_shortcuts, has_shortcuts
from nlsflow.adapters.supernet import NAMED_SUBNETS
from nlsflow.artifacts import read_json, read_table, write_table
from nlsflow.cluster import scoring_pool
from nlsflow.data.datasets import generate_prompt
from nlsflow.deploy.card import CardFacts, Folder, build_card, run_commands, write_card
from nlsflow.deploy.measure import model_stats
from nlsflow.errors import NlsflowError
from nlsflow.evaluation.scoring import score_test_sets
from nlsflow.evaluation.workers import DeployableLoad, TestSetScorer
from nlsflow.methods import Artifact, ExtractPlan, Method, method_for
from nlsflow.models import resolve_device
from schemas.files import ChosenSubnetFile
from schemas.outputs import ExtractOutput, PruneOutput, SearchOutput, TrainOutput
from stages._common import StageContext, main

log = logging.getLogger(__name__)
PROBE_RECORDS = 8
# The equivalence checks run in float32 whatever the run's dtype: bf16 kernels differ in rounding.
CHECK_DTYPE = "float32"


def run(ctx: StageContext) -> ExtractOutput:
    cfg, xc = ctx.cfg, ctx.cfg.extract
    device, method = resolve_device(cfg.device), method_for(cfg)
    base_dir, train_dir = ctx.input_dir("prune") / PruneOutput.files.model, ctx.input_dir("train")
    model, tokenizer, space = method.load(base_dir, train_dir, CHECK_DTYPE, device)
    subnet, subnet_name = chosen_subnet(ctx, space)
    activate(model, space, subnet)
    batch = probe_batch(ctx, tokenizer, device)
    expected = logits(model, batch)

    plan = ExtractPlan(
        out_dir=ctx.out_dir,
        final_dir=ctx.input_dir("extract"),
        prune_dir=ctx.input_dir("prune"),
        train_dir=train_dir,
        tokenizer=tokenizer,
        dtype=cfg.dtype,
        device=device,
        merge=xc.merge,
        tolerance=xc.tolerance,
        merge_tolerance=xc.merge_tolerance,
    )
    artifacts = method.extract(model, space, subnet, plan)
    del model  # the super-network: from here on only what was written is loaded
    if xc.merge:
        artifacts.append(method.merge(plan))
    measured: dict[str, dict] = {}
    metrics = check_artifacts(artifacts, batch, expected, device, plan.metrics, measured)

    deployable = next((a for a in artifacts if a.deployable), None)
    if deployable is None:
        raise NlsflowError(
            f"method {method.name} wrote no deployable folder (extract.merge={xc.merge}); set extract.merge=true"
        )
    records: dict[str, int] = {}
    if xc.evaluate:  # the deployable model, loaded as a user would (by each worker), on the test sets
        ec = cfg.evaluate
        load = DeployableLoad(deployable.load, cfg.dtype, cfg.device, base_dir)
        with scoring_pool(
            TestSetScorer({"extracted": load}, ec.generation), ec.workers, cfg.cluster, cfg.device
        ) as pool:
            rows, scores = score_test_sets(pool, tokenizer, ctx.data_root, ec, "extracted", "extracted")
        write_table(ctx.out_dir / ExtractOutput.files.predictions, "predictions", rows)
        metrics.update(scores)
        records = dict(Counter(row["task"] for row in rows))
    output = ExtractOutput(
        subnet_name=subnet_name, subnet=subnet, check_dtype=CHECK_DTYPE, deployable=deployable.name, **metrics
    )
    write_cards(ctx, method, artifacts, output, measured, records, len(batch["input_ids"]))
    return output


def chosen_subnet(ctx: StageContext, space) -> tuple[dict[str, int], str]:
    """`extract.subnet`: the searched one, a named one, or a given mapping; checked against the search space."""
    choice = ctx.cfg.extract.subnet
    if isinstance(choice, dict):
        subnet, name = choice, "given"
    elif choice == "searched":
        chosen = ctx.input_dir("search") / SearchOutput.files.chosen
        subnet, name = read_json(chosen, ChosenSubnetFile, "search").root, choice
    else:
        subnet, name = NAMED_SUBNETS[choice](space), choice
    try:
        validate_subnet(space, subnet)
    except ValueError as e:
        raise NlsflowError(f"extract.subnet: {e}; see train/search_space.json for the variables and choices") from None
    return subnet, name


def probe_batch(ctx: StageContext, tokenizer, device) -> dict[str, torch.Tensor]:
    """The first validation prompts: what every artifact's logits are compared on."""
    probe = read_table(ctx.input_dir("train") / TrainOutput.files.validation, "records").to_pylist()[:PROBE_RECORDS]
    prompts = [generate_prompt(r["instruction"], r["input"], r["output"]) for r in probe]
    return tokenizer(prompts, return_tensors="pt", padding=True, truncation=True, max_length=256).to(device)


@torch.inference_mode()
def logits(model, batch) -> torch.Tensor:
    out = model(**batch).logits.float()
    return out[batch["attention_mask"].bool()]  # compare real tokens only


def check_artifacts(
    artifacts: list[Artifact], batch, expected, device, metrics: dict, measured: dict[str, dict] | None = None
) -> dict:
    """Load each written folder as a user would; its max |logit difference| from the super-network must be within
    its tolerance, or the stage fails naming it. Returns the metrics with each difference and the adapter's size;
    `measured` gets each folder's model's size (`model_stats`; NOLA's compact form expands to the adapter's)."""
    for artifact in artifacts:
        model = artifact.load(CHECK_DTYPE, device)
        diff = (logits(model, batch) - expected).abs().max().item()
        log.info(
            "%s vs super-network subnet: max |Δlogit| = %.3g (loads with %s)", artifact.name, diff, artifact.loads_with
        )
        if diff > artifact.tolerance:
            merged = artifact.kind == "merged"
            fix = "set extract.merge=false to keep the adapter only" if merged else "this is a bug, please report it"
            raise NlsflowError(
                f"extract/{artifact.name} differs from the super-network by {diff:.3g} > {artifact.tolerance:g} "
                f"(extract.{'merge_' if merged else ''}tolerance); {fix}"
            )
        metrics[_diff_key(artifact)] = diff
        metrics.setdefault("loads_with", {})[artifact.name] = artifact.loads_with
        if measured is not None and artifact.kind != "compact":  # a super-adapter: every rank, not the subnet's
            measured[artifact.name] = model_stats(model)
        if artifact.kind == "adapter":
            shortcuts = attached_shortcuts(model)  # HeteroLoRA's, outside the model's module tree
            lora_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
            metrics["adapter_params"] = lora_params + sum(p.numel() for s in shortcuts for p in s.parameters())
            metrics["base_params"] = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
            metrics["shortcuts"] = bool(shortcuts)
        del model
        gc.collect()
    return metrics


def write_cards(
    ctx: StageContext,
    method: Method,
    artifacts: list[Artifact],
    output: ExtractOutput,
    measured: dict[str, dict],
    records: dict[str, int],
    probe_records: int,
) -> None:
    """A model card (README.md) in every folder written, before the manifest lists the stage's files."""
    final = ctx.input_dir("extract")

    def landed(path: Path) -> str:  # where a path in the temp folder lands
        return str(final / path.relative_to(ctx.out_dir)) if path.is_relative_to(ctx.out_dir) else str(path)

    adapter_stats = next((measured.get(a.name) for a in artifacts if a.kind == "adapter"), None)
    folders = {
        a.name: Folder(
            a.name,
            a.kind,
            a.loads_with,
            base=landed(a.base) if a.base else None,
            tolerance=a.tolerance,
            max_abs_logit_diff=getattr(output, _diff_key(a), None),
            stats=adapter_stats if a.kind == "compact" else measured.get(a.name),
            masked=method.masked and a.kind == "adapter",
            shortcuts=has_shortcuts(ctx.out_dir / a.name),
            remote_code=_remote_code(ctx.out_dir / a.name),
        )
        for a in artifacts
    }
    narrowed = ctx.out_dir / ExtractOutput.files.base  # LoNAS: the base the adapter goes on
    if narrowed.is_dir():
        folders[narrowed.name] = Folder(narrowed.name, "base", "", remote_code=_remote_code(narrowed))
    facts = CardFacts(
        cfg=ctx.cfg,
        prune=ctx.output("prune"),
        train=ctx.output("train"),
        extract=output,
        search=ctx.output("search"),
        extract_dir=str(final),
        train_dir=str(ctx.input_dir("train")),
        folders=folders,
        records=records,
        probe_records=probe_records,
        commands=run_commands(ctx.cfg),
    )
    for name in folders:
        write_card(build_card(facts, name), ctx.out_dir / name)


def _remote_code(folder: Path) -> bool:
    """A narrowed model whose layers keep different widths: its config.json maps the Auto classes to its own code."""
    config = folder / "config.json"
    return config.is_file() and '"auto_map"' in config.read_text()


def _diff_key(artifact: Artifact) -> str:
    return {"adapter": "max_abs_logit_diff", "merged": "merged_max_abs_logit_diff"}.get(
        artifact.kind, f"{artifact.name}_max_abs_logit_diff"
    )


if __name__ == "__main__":
    raise SystemExit(main("extract", run))
