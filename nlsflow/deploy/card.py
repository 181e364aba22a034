"""The model card `extract` writes into every folder it writes: a README.md with Hugging Face metadata.

    card = build_card(facts, "adapter")     # pure: what the manifests and extract's checks say -> ModelCard
    write_card(card, extract_dir / "adapter")

The card says what the folder's model is (base, method, Wanda sparsity, subnet, size), how it was trained and made,
how it scored (when `extract.evaluate` scored it), how to load it with stock libraries, and what was checked. Every
number comes from the run's manifests or from extract's own checks, never from a later stage. It replaces the
README.md PEFT's `save_pretrained` may have written.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from nlsflow.evaluation.intervals import points, points_with_interval
from nlsflow.io import atomic_write_text
from schemas.config import PipelineConfig
from schemas.outputs import ExtractOutput, PruneOutput, SearchOutput, TrainOutput

CARD_NAME = "README.md"

METHODS = {
    "lora": "plain LoRA at the profile's rank (the baseline: no elastic choices)",
    "shears": "Shears: elastic LoRA ranks on a Wanda-sparse base, searched (NSGA-II) for the subnet",
    "lonas": "LoNAS: elastic LoRA ranks and elastic MLP widths of the base, searched for the subnet",
    "nola": "NOLA: LoRA factors as combinations of seeded random bases (only the coefficients train), elastic ranks",
    "heterolora": "HeteroLoRA: a saliency proxy chooses which LoRA modules (and shortcuts) train, elastic ranks",
}
KINDS = {  # folder kind -> (what it is, library_name, the hub's base_model_relation)
    "adapter": ("LoRA sub-adapter (PEFT format)", "peft", "adapter"),
    "merged": ("merged model: the sub-adapter merged into the pruned base", "transformers", "finetune"),
    "compact": ("NOLA compact sub-adapter: coefficients, seed and shapes (nlsflow)", None, "adapter"),
    "base": ("LoNAS narrowed base: the pruned base with the subnet's MLP widths", "transformers", "finetune"),
}


@dataclass(frozen=True)
class Folder:
    """One folder under extract/, as its card describes it."""

    name: str
    kind: str  # a key of KINDS
    loads_with: str  # ExtractOutput.loads_with's entry ("" for LoNAS' base, which is not a model on its own)
    base: str | None = None  # the base folder an adapter goes on
    tolerance: float | None = None  # None: not checked on its own (LoNAS' base)
    max_abs_logit_diff: float | None = None
    stats: dict[str, int] | None = None  # nlsflow.deploy.measure.model_stats of the model it loads into
    masked: bool = False  # Shears: make_sparsity_preserving after loading
    shortcuts: bool = False  # HeteroLoRA: shortcut files to attach after loading
    remote_code: bool = False  # a narrowed model whose layers keep different widths (per_layer_llama)


@dataclass(frozen=True)
class CardFacts:
    """What every card of one extract run is built from."""

    cfg: PipelineConfig
    prune: PruneOutput
    train: TrainOutput
    extract: ExtractOutput
    search: SearchOutput | None  # None: the subnet was not searched
    extract_dir: str  # where the folders land (paths in the cards name it)
    train_dir: str
    folders: dict[str, Folder]
    records: dict[str, int]  # test set -> records scored (empty: not scored)
    probe_records: int  # validation prompts the logit checks ran on
    commands: list[str]  # shell lines that made the run


def build_card(facts: CardFacts, name: str) -> ModelCard:
    """The card of folder `name` (a key of facts.folders)."""
    folder, x = facts.folders[name], facts.extract
    what, library, relation = KINDS[folder.kind]
    scored = x.scores is not None and name == x.deployable
    data = ModelCardData(
        base_model=facts.prune.base_model,
        base_model_relation=relation,
        base_model_revision=facts.prune.base_revision,
        library_name=library,
        pipeline_tag="text-generation",
        tags=_tags(facts, folder),
        datasets=list(facts.train.train_sets) or None,
        model_name=f"{facts.cfg.method.name}-{facts.cfg.task}-{facts.cfg.profile}-{name}" if scored else None,
        eval_results=_eval_results(facts) if scored else None,
    )
    sections = [
        f"# {facts.cfg.method.name} {facts.cfg.task}: {what}\n\n"
        f"Written by nlsflow's `extract` stage into `{facts.extract_dir}/{name}/`.",
        _model(facts, folder),
        _training(facts),
        _evaluation(facts, folder),
        _made(facts),
        _loading(facts, folder),
        _limits(facts, folder),
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")


def write_card(card: ModelCard, folder: Path) -> Path:
    """`folder`/README.md, written atomically (over PEFT's, if any)."""
    path = Path(folder) / CARD_NAME
    atomic_write_text(path, str(card))
    return path


def run_commands(cfg: PipelineConfig) -> list[str]:
    """The `make pipeline` line that layers this run's task, profile and method (nlsflow.layers), with ARGS for the
    settings of the stages up to extract that the layering does not give (a profile that is no file of configs/ gets
    none); and the run's resolved settings, which the pipeline writes into the run folder."""
    from nlsflow.config import RUN_CONFIG_NAME, load_config
    from nlsflow.errors import NlsflowError
    from nlsflow.layers import config_files

    lines = []
    try:
        layered = load_config(
            config_files(cfg.task, cfg.profile, cfg.method.name),
            [f"run_dir={cfg.run_dir}", f"data.root={cfg.data.root}"],
        )
    except NlsflowError:
        layered = None
    if layered is not None:
        stages = ("prune", "train", "search", "extract")
        before = {s: json.loads(json.dumps(layered.stage_config(s))) for s in stages}
        now = {s: json.loads(json.dumps(cfg.stage_config(s))) for s in stages}
        overrides = {}
        for stage in stages:
            overrides.update(_differences(before[stage], now[stage]))
        args = " ".join(f"{key}={_value(value)}" for key, value in sorted(overrides.items()))
        make = f"make pipeline TASK={cfg.task} PROFILE={cfg.profile} METHOD={cfg.method.name} RUN_DIR={cfg.run_dir}"
        lines.append(make + (f" ARGS={shlex.quote(args)}" if args else ""))
    lines += [
        "# or with the resolved settings the pipeline writes into the run folder:",
        f"python -m flows.pipeline --config {Path(cfg.run_dir) / RUN_CONFIG_NAME}",
    ]
    return lines


def _differences(before: dict[str, Any], now: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted key -> the run's value, for every setting that differs (as `key=value` overrides name them)."""
    out = {}
    for key in sorted(before.keys() | now.keys()):
        old, new = before.get(key), now.get(key)
        if old == new or key not in now:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            out.update(_differences(old, new, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}".removeprefix("shared.")] = new
    return out


def _value(value: Any) -> str:
    return value if isinstance(value, str) and value and " " not in value else json.dumps(value)


def _tags(facts: CardFacts, folder: Folder) -> list[str]:
    tags = ["nlsflow", facts.cfg.method.name, "lora"]
    if facts.prune.sparsity > 0:
        tags += ["pruning", "sparsity", facts.cfg.prune.method]
    if folder.kind == "compact":
        tags.append("nola-compact")
    return tags


def _eval_results(facts: CardFacts) -> list[EvalResult]:
    x = facts.extract
    results = []
    metrics = [("accuracy (LLM-Adapters rules)", x.accuracy), ("accuracy (strict)", x.accuracy_strict)]
    if x.accuracy_cloze is not None:
        metrics.append(("accuracy (lm-eval's zero-shot cloze)", x.accuracy_cloze))
    for test_set in x.accuracy:
        for metric, value in metrics:
            results.append(
                EvalResult(
                    task_type="text-generation",
                    dataset_type=test_set,
                    dataset_name=test_set,
                    dataset_split="test",
                    metric_type="accuracy",
                    metric_name=metric,
                    metric_value=round(value[test_set], 4),
                )
            )
    return results


def _model(facts: CardFacts, folder: Folder) -> str:
    cfg, prune, x = facts.cfg, facts.prune, facts.extract
    revision = f"revision `{prune.base_revision}`" if prune.base_revision else "no hub revision (a local folder)"
    if prune.sparsity > 0:
        pruning = (
            f"{cfg.prune.method}, {cfg.prune.structure}: {100 * prune.sparsity:.1f}% of the weights of "
            f"{prune.pruned_layers} linear layers zeroed ({prune.nonzero_params:,} of {prune.params:,} base "
            f"parameters non-zero; WikiText-2 perplexity {prune.ppl_dense:.2f} dense, {prune.ppl_pruned:.2f} pruned)"
        )
    else:
        pruning = "none (prune.sparsity 0: the dense base)"
    lines = [
        "## Model",
        "",
        f"- Base model: `{prune.base_model}`, {revision}",
        f"- Method: {METHODS.get(cfg.method.name, cfg.method.name)}",
        f"- Pruning: {pruning}",
        f"- This folder: {KINDS[folder.kind][0]}" + (f"; loads with {folder.loads_with}" if folder.loads_with else ""),
        f"- Subnet: `{x.subnet_name}` (variable -> choice: LoRA rank, or MLP width for LoNAS' width variables)",
        "",
        "| variable | choice |",
        "|---|---|",
        *(f"| {variable} | {choice} |" for variable, choice in x.subnet.items()),
    ]
    if x.mlp_widths:
        lines += ["", f"MLP width of every layer of the narrowed base: {x.mlp_widths}"]
    stats = folder.stats
    if stats is not None:
        what = "the model it loads into" + (" (with its base)" if folder.base else "")
        lines += [
            "",
            f"Size of {what}:",
            "",
            "| parameters | non-zero parameters | MACs per token | non-zero MACs per token |",
            "|---|---|---|---|",
            f"| {stats['params']:,} | {stats['nonzero_params']:,} | {stats['macs_per_token']:,} | "
            f"{stats['nonzero_macs_per_token']:,} |",
        ]
    if folder.kind in ("adapter", "compact"):
        lines += ["", f"Adapter parameters: {x.adapter_params:,} (on a base of {x.base_params:,})."]
    return "\n".join(lines)


def _training(facts: CardFacts) -> str:
    t = facts.train
    dropped = t.contamination.dropped
    return "\n".join(
        [
            "## Training",
            "",
            f"- Task: {facts.cfg.task}; training sets: {', '.join(t.train_sets)} (nlsflow's registered files)",
            f"- Records: {t.train_records:,} trained on, {t.val_records:,} held out for the search"
            + (f"; {dropped:,} dropped as test questions (data.contamination=drop)" if dropped else ""),
            f"- {t.steps:,} optimizer steps, final loss {t.final_loss:.4f}; {t.trainable_params:,} trainable "
            f"parameters in the super-adapter ({facts.cfg.dtype})",
        ]
    )


def _evaluation(facts: CardFacts, folder: Folder) -> str:
    x = facts.extract
    lines = ["## Evaluation", ""]
    if x.scores is None:
        lines.append("Not scored on the test sets: `extract.evaluate` was off.")
        if facts.search is not None and x.subnet_name == "searched":
            s = facts.search
            lines.append(
                f"The search scored this subnet {points(s.chosen_accuracy)}% on {s.val_samples} held-out "
                "validation records (not a test score)."
            )
        return "\n".join(lines)
    if folder.name == x.deployable:
        lines.append("This folder's model, loaded as below, on the test sets (greedy generation):")
    else:
        lines.append(
            f"Scored as `{x.deployable}/` (greedy generation), whose logits this folder's model reproduces within "
            "the tolerance under *Limits*:"
        )
    intervals, cloze = x.accuracy_interval or {}, x.accuracy_cloze  # the cloze: multiple choice only
    cloze_intervals = x.accuracy_cloze_interval or {}
    lines += [
        "",
        "| test set | records | accuracy % [95% interval] (LLM-Adapters rules) | accuracy % (strict) |"
        + (" accuracy % [95% interval] (lm-eval's cloze) |" if cloze else ""),
        "|---|---|---|---|" + ("---|" if cloze else ""),
        *(
            f"| {name} | {facts.records.get(name, '?')} | "
            f"{points_with_interval(x.accuracy[name], intervals.get(name))} | {points(x.accuracy_strict[name])} |"
            + (f" {points_with_interval(cloze[name], cloze_intervals.get(name))} |" if cloze else "")
            for name in x.accuracy
        ),
        f"| average{'' if x.averaged is None else ' of ' + ', '.join(x.averaged)} | "
        f"{sum(facts.records.values())} | {points_with_interval(x.average_accuracy, x.average_accuracy_interval)} | "
        f"{points(x.average_accuracy_strict)} |"
        + (f" {points_with_interval(x.average_accuracy_cloze, x.average_accuracy_cloze_interval)} |" if cloze else ""),
        "",
        "Protocols: the reference one scores answers as LLM-Adapters' evaluation scripts do; the strict one takes "
        "only the answer the generation commits to"
        + (
            "; lm-eval's zero-shot cloze generates nothing: each option's own text follows the question and the "
            "likeliest is the answer (acc_norm where lm-eval reports it)"
            if cloze
            else ""
        )
        + ". The intervals are 95% percentile bootstraps over the records (resampled within each set; the average's "
        "statistic is the mean of the sets' accuracies).",
    ]
    return "\n".join(lines)


def _made(facts: CardFacts) -> str:
    prune = facts.cfg.prune.method.capitalize()
    lines = ["## How it was made", "", f"prune ({prune}) -> train -> evaluate -> search (NSGA-II) -> extract:", ""]
    if facts.commands:
        lines += ["```sh", *facts.commands, "```", ""]
    run_dir = Path(facts.extract_dir).parent
    lines.append(
        f"Each stage's resolved settings, input digests and measurements are in `{run_dir}/<stage>/manifest.json`."
    )
    return "\n".join(lines)


def _loading(facts: CardFacts, folder: Folder) -> str:
    path = f"{facts.extract_dir}/{folder.name}"
    remote = ", trust_remote_code=True" if folder.remote_code else ""
    if folder.kind == "adapter":
        code = [
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'base = AutoModelForCausalLM.from_pretrained("{folder.base}"{remote})',
            f'model = PeftModel.from_pretrained(base, "{path}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{folder.base}")',
        ]
    elif folder.kind == "compact":
        code = [
            "import json",
            "from pathlib import Path",
            "",
            "import torch",
            "from nlsflow.adapters.elastic import activate",
            "from nlsflow.adapters.supernet import load_supernet",
            "",
            f'folder = Path("{path}")',
            "model, tokenizer, space = load_supernet(",
            f'    Path("{folder.base}"), folder, Path("{facts.train_dir}/search_space.json"), "float32", '
            'torch.device("cpu")',
            ")",
            'activate(model, space, json.loads((folder / "subnet.json").read_text()))',
        ]
    else:
        code = [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{path}"{remote})',
            f'tokenizer = AutoTokenizer.from_pretrained("{path}")',
        ]
    if folder.masked:
        code += [
            "",
            "from nlsflow.adapters.masking import make_sparsity_preserving",
            "",
            "make_sparsity_preserving(model)  # the delta masked by the base's zeros, as it trained",
        ]
    if folder.shortcuts:
        code += ["", "from nlsflow.adapters.shortcuts import load_shortcuts", "", f'load_shortcuts(model, "{path}")']
    notes = {
        "adapter": "The adapter goes on the pruned base it was trained on (the folder named above), not on the dense "
        "hub model.",
        "merged": "A whole model folder: no adapter goes on it.",
        "compact": "Needs nlsflow: the bases are regenerated from the seed and the factors expanded at the subnet "
        "in subnet.json. `adapter/` holds the same factors as a stock PEFT adapter.",
        "base": "The base alone is not the trained model: `adapter/` goes on it (its adapter_config.json names this "
        "folder).",
    }
    needs = []
    if folder.masked:
        needs.append(
            "Stock PEFT alone does not apply the base's mask to the delta: without it this is not the "
            "trained model (`merged/` is, and deploys)."
        )
    if folder.shortcuts:
        needs.append("The shortcut modules are not LoRA: nlsflow attaches them from the folder's files.")
    if folder.remote_code:
        needs.append("Its layers keep different MLP widths: the folder holds its own modeling code (per_layer_llama).")
    return "\n".join(["## How to load", "", "```python", *code, "```", "", notes[folder.kind], *needs])


def _limits(facts: CardFacts, folder: Folder) -> str:
    x, cfg = facts.extract, facts.cfg
    lines = ["## Limits", ""]
    if folder.tolerance is not None:
        lines.append(
            f"- Exact to a tolerance: loaded as above, this model's logits equal the super-network's at the chosen "
            f"subnet within {folder.tolerance:g} (measured max |Δlogit| {folder.max_abs_logit_diff:.3g}, on the "
            f"first {facts.probe_records} validation prompts, in {x.check_dtype})."
        )
    else:
        lines.append("- Not checked on its own: it is the base `adapter/` goes on, and `adapter/` on it is checked.")
    if folder.kind in ("merged", "base") and cfg.dtype != "float32":
        lines.append(
            f"- The weights are saved in {cfg.dtype}: the check compares the float32 model, and these weights are "
            f"exactly it cast to {cfg.dtype}; in {cfg.dtype} the logits differ from it by that rounding."
        )
    if x.scores is not None:
        total = sum(facts.records.values())
        lines.append(
            f"- The accuracies are on {total} test records ({', '.join(f'{k}: {v}' for k, v in facts.records.items())})"
            "; the intervals count the records' sampling noise only, not the training seed's."
        )
    lines.append(
        "- MACs per token count every linear layer (LoRA factors included) for one token, attention scores "
        "excluded; the non-zero ones leave out the base's zero weights, which only a sparse kernel skips."
    )
    if cfg.model.name_or_path == "tiny":
        lines.append(
            "- The base is the tiny random Llama nlsflow builds for tests: a pipeline check, not a usable model."
        )
    lines.append("- The paths above are where the run wrote its folders: in a copied run folder, change them.")
    return "\n".join(lines)
