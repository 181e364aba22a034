"""`make study TASK=commonsense PROFILE=smollm2`: every method against plain LoRA on one committed setting, and the
seeds' table generated from the manifests.

The study's settings are `configs/studies/<task>-<profile>.yaml`, added after each method's configs, so that every
method gets the same data, steps and evaluation. The runs go through `flows.compare` (runs/<task>-<profile>-<method>-
study), and each resumes stage by stage, and within training from its last checkpoint. Each finished row is
published into `results/<task>-<profile>/<row>/` (its config, manifests, JSON files and tables, not its weights;
committed), and a published row whose settings are the study's is not run again, on any machine. The study then
writes, from the published rows, `results/<task>-<profile>/`:
- `results.md`: the table (method | total params | non-zero params | MACs/token | trainable params | adapter bytes |
  per-task accuracy | average [95% interval] | Δ vs LoRA [paired 95% interval] | % of LoRA), with each method's
  heuristic subnet where its search chose another, the dense base and each pruned base that a row scored
  (evaluate.baselines [pruned]); the reading pairs a heuristic subnet with its method's, a pruned base with the dense;
- `results.parquet`: the same rows;
- `accuracy_vs_macs.png`: test accuracy against non-zero MACs per token and against non-zero parameters, by each
  protocol scored (LoRA, the dense base and chance marked), beside each method's searched Pareto front on the
  validation slice.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from flows.compare import (
    METHODS,
    PROTOCOL_KEYS,
    Variant,
    accuracy_columns,
    against_lora,
    compare,
    extracted_answers,
    method_row,
    pair_with_lora,
    print_plans,
    row_config,
)
from flows.runners import RUNNERS
from nlsflow.artifacts import (
    publish_evidence,
    read_json,
    read_manifest,
    read_output,
    read_table,
    rerun_reason,
    stage_dir,
    write_table,
)
from nlsflow.cli import expand_args
from nlsflow.config import RUN_CONFIG_NAME, load_config
from nlsflow.data.datasets import EVAL_DATASETS
from nlsflow.errors import NlsflowError, format_validation_error
from nlsflow.evaluation.answers import chance_level
from nlsflow.evaluation.generation import evaluate_dataset
from nlsflow.evaluation.intervals import (
    correct_by_task,
    paired_difference,
    points,
    points_interval,
    points_with_interval,
    proportion_interval,
)
from nlsflow.evaluation.likelihood import rank_labels, rank_options
from nlsflow.evaluation.scoring import by_source
from nlsflow.evaluation.workers import AtSubnet, SupernetLoad
from nlsflow.io import atomic_write_text
from nlsflow.yaml12 import yaml_load
from schemas.config import STAGES, PipelineConfig
from schemas.files import SearchSpaceFile
from schemas.outputs import BenchmarkOutput, EvaluateOutput, ExtractOutput, PruneOutput, SearchOutput, TrainOutput

STUDIES = Path(__file__).resolve().parent.parent / "configs" / "studies"
RESULTS = Path(__file__).resolve().parent.parent / "results"  # each study's published rows and tables, committed
BASE = "dense base"
CHANCE = "chance"  # a uniform guess among each test record's options
COUNTS = ("params", "nonzero_params", "nonzero_macs_per_token", "trainable_params", "adapter_bytes")
# What each row's seed reports against plain LoRA, at the seed's own scale, set beside this study's reading.
SEED_CLAIMS = {
    "shears": "Shears README, LLaMA-7B at 50% sparsity: 72.5 against LoRA's 74.7 on commonsense (97.1%), 45.3 against "
    "46.9 on math (96.6%)",
    "shears-40": "Shears README, LLaMA-7B at 40% sparsity: 74.9 against LoRA's 74.7 on commonsense (100.3%), 46.9 "
    "against 46.9 on math (100%)",
    "lonas": "LoNAS README, LLaMA-7B commonsense: 65.2 against LoRA's 65.8 at 0.82× the TFLOPs (99.1%)",
    "nola": "NOLA README: no loss of accuracy at about 20× fewer parameters than the smallest LoRA (LLaMA-2 70B)",
    "heterolora": "HeteroLoRA paper: +1.6 points over LoRA at an equal parameter budget",
}


def study_config(task: str, profile: str) -> Path:
    path = STUDIES / f"{task}-{profile}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in STUDIES.glob("*.yaml") if ".variants" not in p.suffixes)) or "none"
        raise NlsflowError(f"no study config {path}; studies: {known} (add configs/studies/{task}-{profile}.yaml)")
    return path


class StudyVariant(BaseModel):
    """An extra row of a study (configs/studies/<task>-<profile>.variants.yaml): a method with overrides."""

    model_config = ConfigDict(extra="forbid")

    method: Literal[METHODS]
    overrides: list[str] = []


def study_variants(task: str, profile: str) -> dict[str, Variant]:
    """The study's extra rows by name, from its variants file (none without one)."""
    path = STUDIES / f"{task}-{profile}.variants.yaml"
    if not path.is_file():
        return {}
    try:
        entries = TypeAdapter(dict[str, StudyVariant]).validate_python(yaml_load(path.read_text()) or {})
    except ValidationError as e:
        raise NlsflowError(f"{path}: {format_validation_error(e)}") from None
    if clash := sorted(set(entries) & set(METHODS)):
        raise NlsflowError(f"{path}: variant names {clash} are methods' names; name them apart (e.g. shears-30)")
    return {name: Variant(v.method, tuple(v.overrides)) for name, v in entries.items()}


def run_study(
    task: str,
    profile: str,
    methods=METHODS,
    runs: Path = Path("runs"),
    overrides=(),
    runner: str = "local",
    plan: bool = False,
    results: Path = RESULTS,
    existing: bool = False,
) -> Path | None:
    """Run the study's rows that are not published yet, publish each, and write the results folder from what is
    published; returns that folder. `existing`: run nothing, tabulate the published rows. `plan`: print which rows
    are published and which stages of the others would run; run nothing (returns None)."""
    if "lora" not in methods:
        raise NlsflowError("a study needs plain LoRA, its baseline row: add lora to the methods")
    variants = study_variants(task, profile)
    if unknown := [m for m in methods if m not in METHODS and m not in variants]:
        raise NlsflowError(
            f"unknown study rows {unknown}: choose from the methods {list(METHODS)} and the variants {list(variants)} "
            f"(configs/studies/{task}-{profile}.variants.yaml)"
        )
    row = dict(
        extra_configs=[study_config(task, profile)],
        suffix="-study",
        # the dense base, scored once, by LoRA's run
        variants={**variants, "lora": Variant("lora", ("evaluate.baselines=[dense]",))},
    )
    out = results / f"{task}-{profile}"
    published = {m: out / m for m in methods}
    pending = {}
    for m in methods:
        files, settings = row_config(task, profile, m, runs, overrides, **row)
        if why := unpublished(published[m], load_config(files, [*settings, f"run_dir={published[m]}"])):
            pending[m] = why
    if plan:
        for m in methods:
            print(f"{m}: {pending.get(m) or 'published, up to date'} ({published[m]})")
        print_plans(task, profile, list(pending), runs, overrides=overrides, **row)
        return None
    if pending and not existing:  # each row is published as soon as it finishes: a later row may not, here
        compare(
            task,
            profile,
            list(pending),
            runs,
            overrides,
            runner,
            **row,
            finished=lambda m, run_dir: publish_evidence(run_dir, published[m]),
        )
        pending = {}
    done = [m for m in methods if m not in pending]
    if "lora" not in done:
        raise NlsflowError(f"LoRA's row is not in {out} ({pending['lora']}); run the study without --existing first")
    rows = [method_row(published[m], m, missing_ok=True) for m in done]
    against_lora(rows, {m: published[m] for m in done})
    table = results_rows(rows, published)
    write_table(out / "results.parquet", "study", table)
    markdown = results_markdown(table, task, profile, test_records(published["lora"]), pending)
    atomic_write_text(out / "results.md", markdown)
    plot_study(table, {m: published[m] for m in done}, out / "accuracy_vs_macs.png")
    return out


def unpublished(evidence: Path, cfg: PipelineConfig) -> str | None:
    """Why a row's published evidence cannot stand for it (none yet, made with other settings, a file altered);
    None when every stage's evidence is up to date with `cfg`."""
    if not evidence.is_dir():
        return "not run yet"
    for stage in STAGES:
        if why := rerun_reason(evidence, stage, cfg, missing_ok=True):
            return f"{stage}: {why}"
    return None


def pilot(task: str, profile: str, runs: Path = Path("runs"), results: Path = RESULTS) -> Path:
    """The budget check, on the validation slice only (never a test set): the study's LoRA run against the dense
    base (the same model, its adapter off) and, for multiple-choice records, against a uniform guess among each
    record's options, on every held-out validation record, paired. Needs LoRA's train stage in `runs` (its
    weights); writes `<results>/<task>-<profile>/pilot.md` and returns it."""
    run_dir = runs / f"{task}-{profile}-lora-study"
    train_dir = stage_dir(run_dir, "train")
    trained: TrainOutput = read_output(run_dir, "train")  # a finished train stage, or a one-line error naming it
    cfg = load_config([run_dir / RUN_CONFIG_NAME])
    subnet = read_json(train_dir / TrainOutput.files.search_space, SearchSpaceFile, "train").subnets["maximal"]
    model, tokenizer = AtSubnet(
        SupernetLoad(cfg, stage_dir(run_dir, "prune") / PruneOutput.files.model, train_dir), subnet
    )()
    records = read_table(train_dir / TrainOutput.files.validation, "records").to_pylist()
    generation = cfg.search.generation
    levels = {source: [chance_level(r["instruction"]) for r in rows] for source, rows in by_source(records).items()}
    multiple_choice = all(level is not None for rows in levels.values() for level in rows)
    # generated, as the search scores them; the labels ranked by likelihood (the choice alone); lm-eval's cloze
    answers, ranked, clozed = {}, {}, {}
    for name, adapter in (("LoRA", contextlib.nullcontext()), ("dense base", model.disable_adapter())):
        with adapter:
            answers[name] = {
                source: [
                    r["correct"]
                    for r in evaluate_dataset(
                        model,
                        tokenizer,
                        EVAL_DATASETS[source],
                        rows,
                        max_new_tokens=generation.max_new_tokens,
                        num_beams=generation.num_beams,
                        batch_size=generation.batch_size,
                    )
                ]
                for source, rows in by_source(records).items()
            }
            if multiple_choice:
                ranked[name] = {
                    source: [
                        r["correct"] for r in rank_labels(model, tokenizer, rows, batch_size=generation.batch_size)
                    ]
                    for source, rows in by_source(records).items()
                }
                clozed[name] = {
                    source: [
                        r["correct_norm"]
                        for r in rank_options(model, tokenizer, rows, source, batch_size=generation.batch_size)
                    ]
                    for source, rows in by_source(records).items()
                }
    return write_pilot(task, profile, trained, cfg, len(records), answers, ranked, clozed, levels, results)


def write_pilot(
    task: str,
    profile: str,
    trained: TrainOutput,
    cfg: PipelineConfig,
    records: int,
    answers: dict[str, dict[str, list[bool]]],
    ranked: dict[str, dict[str, list[bool]]],
    clozed: dict[str, dict[str, list[bool]]],
    levels: dict[str, list[float | None]],
    results: Path,
) -> Path:
    """`pilot.md` from the pilot's paired answers: `answers[name][source]` generated, `ranked[name][source]` by
    label likelihood and `clozed[name][source]` by lm-eval's cloze, acc_norm (both empty for open answers),
    `levels[source]` each record's chance level (None for open answers)."""
    generation = cfg.search.generation
    columns = {"dense base": answers["dense base"], "LoRA": answers["LoRA"]}
    if ranked:  # multiple choice: a uniform guess, and the choice alone
        columns = {
            CHANCE: levels,
            **columns,
            "dense base, ranked": ranked["dense base"],
            "LoRA, ranked": ranked["LoRA"],
            "dense base, cloze": clozed["dense base"],
            "LoRA, cloze": clozed["LoRA"],
        }
    # the slice as one sample (its sources are in proportion to the training mixture, some with a few records)
    pooled = {name: {"validation": [c for rows in by_set.values() for c in rows]} for name, by_set in columns.items()}
    lines = [
        f"### Pilot: plain LoRA against the dense base on the validation slice ({task}, {profile})",
        "",
        f"LoRA after {trained.steps} steps of {cfg.train.batch_size} sequences ({trained.train_records:,} training "
        f"records) at a peak learning rate of {cfg.train.learning_rate:g}; {records} held-out validation records, "
        f"scored as the search scores them ({generation.num_beams} beam(s), {generation.max_new_tokens} new tokens)"
        + (
            ", and ranked: each record's labels in order of the likelihood the model gives their response after the "
            "prompt, the answer format taken out; and by lm-eval's zero-shot cloze: each option's own text after the "
            "question, the likeliest per character (acc_norm)."
            if ranked
            else "."
        ),
        "",
        "| source | records | " + " | ".join(columns) + " | Δ vs dense |",
        "|---|---:" + "|---:" * (len(columns) + 1) + "|",
    ]
    for source, lora_answers in answers["LoRA"].items():
        n = len(lora_answers)
        accuracy = {name: 100 * sum(by_set[source]) / n for name, by_set in columns.items()}
        shown = " | ".join(f"{value:.1f}" for value in accuracy.values())
        lines.append(f"| {source} | {n} | {shown} | {accuracy['LoRA'] - accuracy['dense base']:+.1f} |")
    lines.append("")
    comparisons = [  # (minuend, subtrahend, who is compared, with whom)
        ("LoRA", "dense base", "LoRA", "the dense base"),
        ("LoRA", CHANCE, "LoRA", "a uniform guess"),
        ("LoRA, ranked", "dense base, ranked", "LoRA", "the dense base, on the choice alone"),
        ("LoRA, cloze", "dense base, cloze", "LoRA", "the dense base, by lm-eval's cloze"),
        ("dense base, cloze", CHANCE, "the dense base", "a uniform guess, by lm-eval's cloze"),
    ]
    for mine, other, who, whom in (c for c in comparisons if c[0] in pooled and c[1] in pooled):
        difference, (low, high), _ = paired_difference(pooled[mine], pooled[other])
        verdict = "clearly beats" if low > 0 else "falls below" if high < 0 else "does not separably beat"
        lines += [
            f"{mine} − {other} over the {records} records: {points(difference, True)} points, 95% interval "
            f"{points_interval((low, high), True)} (paired bootstrap): at this budget {who} {verdict} {whom}.",
            "",
        ]
    out = results / f"{task}-{profile}" / "pilot.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "\n".join(lines).rstrip() + "\n")
    return out


def results_rows(rows: list[dict], run_dirs: dict[str, Path]) -> list[dict]:
    """compare's rows with each method's per-task accuracies, each followed by its heuristic subnet where the search
    chose another, then the bases scored without adapter: the dense base (by LoRA's evaluate) and each pruned base
    (by a pruned row's evaluate, with evaluate.baselines [pruned]). Every row is paired with LoRA's extracted model;
    a heuristic subnet also with the subnet its method deploys, a pruned base with the dense base."""
    methods = []
    for row in rows:
        extracted: ExtractOutput = read_output(run_dirs[row["method"]], "extract", verify=False)
        methods.append({**row, **by_task(extracted.scores)})
    lora = next(r for r in methods if r["method"] == "lora")

    def paired(row: dict, answers: Callable[[str], dict], reference: tuple | None = None) -> dict:
        row = {**dict.fromkeys(methods[0]), **row}
        pair_with_lora(row, lora, answers, run_dirs["lora"])  # the same LoRA model as every other row's
        if reference is not None:
            pair_with_reference(row, answers, *reference)
        return row

    table = []
    for row in methods:
        table.append(row)
        if row["method"] != "lora" and (heuristic := heuristic_row(run_dirs[row["method"]], row["method"])):
            table.append(paired(*heuristic, (row, partial(extracted_answers, run_dirs[row["method"]]))))
    dense = base_row(run_dirs["lora"], "dense")
    table += [paired(*dense)] if dense else []
    for row in methods:
        if row["method"] != "lora" and (pruned := base_row(run_dirs[row["method"]], "pruned")):
            table.append(paired(*pruned, dense))
    if chance := chance_row(run_dirs["lora"], table):
        table.append(chance)
    return table


def heuristic_row(run_dir: Path, method: str) -> tuple[dict, Callable[[str], dict]] | None:
    """The subnet a run's evaluate scored on the super-network (evaluate.subnet, the heuristic), as a row with its
    answers by a prediction rows' key, where the search chose another; None where the run deploys that one. It is
    not deployed, so it has no counts."""
    evaluate: EvaluateOutput = read_output(run_dir, "evaluate", verify=False)
    extracted: ExtractOutput = read_output(run_dir, "extract", verify=False)
    if evaluate.subnet == extracted.subnet:
        return None
    predictions = read_table(stage_dir(run_dir, "evaluate") / EvaluateOutput.files.predictions, "predictions")
    scored = [r for r in predictions.to_pylist() if r["model"] == evaluate.subnet_name]
    row = {
        "method": f"{method} {evaluate.subnet_name}",
        **accuracy_columns(evaluate),
        "accuracy_strict": evaluate.average_accuracy_strict,
        **by_task(evaluate),
    }
    return row, partial(correct_by_task, scored, evaluate.averaged)


def base_row(run_dir: Path, baseline: Literal["dense", "pruned"]) -> tuple[dict, Callable[[str], dict]] | None:
    """The base that a run's evaluate scored without adapter (`baseline`), as a row (counted as the run's benchmark
    measured it: dequantized weights can hold exact zeros) with its answers by a prediction rows' key; None where
    the run did not score it, or where its "pruned" base is the dense one."""
    evaluate: EvaluateOutput = read_output(run_dir, "evaluate", verify=False)
    pc = read_manifest(stage_dir(run_dir, "prune"), "prune", verify=False).config["prune"]
    unpruned = not pc["sparsity"] and pc["structure"] == "unstructured"
    if (scores := evaluate.baselines.get(baseline)) is None or (baseline == "pruned" and unpruned):
        return None
    benchmarked: BenchmarkOutput = read_output(run_dir, "benchmark", verify=False)
    counted = benchmarked.results.get(baseline)
    counted_as = {"params", "nonzero_params", "macs_per_token", "nonzero_macs_per_token"}
    counts = counted.model_dump(include=counted_as) if counted else {}
    predictions = read_table(stage_dir(run_dir, "evaluate") / EvaluateOutput.files.predictions, "predictions")
    scored = [r for r in predictions.to_pylist() if r["model"] == baseline]
    level = pc["structure"] if pc["structure"] != "unstructured" else f"{pc['sparsity']:.0%}"
    row = {
        "method": BASE if baseline == "dense" else f"{pc['method']} {level} base",
        **counts,
        "trainable_params": 0,
        **accuracy_columns(scores),
        "accuracy_strict": scores.average_accuracy_strict,
        **by_task(scores),
    }
    return row, partial(correct_by_task, scored, scores.averaged)


def pair_with_reference(
    row: dict, answers: Callable[[str], dict], reference: dict, reference_answers: Callable
) -> None:
    """`row`'s paired difference from another row of the table (`reference`) on the same records, in place, by each
    protocol both were scored by."""
    row["reference"] = reference["method"]
    for suffix, key in PROTOCOL_KEYS.items():
        if row.get(f"accuracy{suffix}") is not None and reference.get(f"accuracy{suffix}") is not None:
            delta, (low, high), _ = paired_difference(answers(key), reference_answers(key))
            row |= dict(zip(against_reference_columns(suffix), (delta, low, high)))


def against_reference_columns(suffix: str) -> tuple[str, ...]:
    """The columns a pairing with a reference row fills, by the protocol whose columns end in `suffix`."""
    return f"delta{suffix}_vs_reference", f"delta{suffix}_vs_reference_low", f"delta{suffix}_vs_reference_high"


def by_task(scores) -> dict:
    """A `Scores`' per-test-set accuracies, by each protocol (the cloze's None where it was not scored)."""
    return {"accuracy_by_task": scores.accuracy, "accuracy_cloze_by_task": scores.accuracy_cloze}


def chance_row(lora_dir: Path, table: list[dict]) -> dict | None:
    """A uniform guess among each test record's options, as a row against LoRA on the same records (None where an
    answer is open, as in math): a retention of LoRA's accuracy means something only where LoRA beats it. The same
    expectation stands for every protocol."""
    extracted: ExtractOutput = read_output(lora_dir, "extract", verify=False)
    predictions = read_table(stage_dir(lora_dir, "extract") / ExtractOutput.files.predictions, "predictions")
    levels: dict[str, dict[int, float]] = {}
    for r in predictions.to_pylist():
        if (level := chance_level(r["prompt"])) is None:
            return None
        levels.setdefault(r["task"], {})[r["index"]] = level
    expected = {task: sum(by_index.values()) / len(by_index) for task, by_index in levels.items()}
    averaged = extracted.averaged or list(levels)
    lora = next(r for r in table if r["method"] == "lora")
    accuracy = sum(expected[t] for t in averaged) / len(averaged)  # an expectation, exact: no interval
    cloze = lora.get("accuracy_cloze") is not None
    row = {
        **dict.fromkeys(table[0]),
        "method": CHANCE,
        "accuracy": accuracy,
        "accuracy_cloze": accuracy if cloze else None,
        "accuracy_by_task": expected,
        "accuracy_cloze_by_task": expected if cloze else None,
    }
    pair_with_lora(row, lora, lambda key: {t: levels[t] for t in averaged}, lora_dir)
    return row


def test_records(run_dir: Path) -> dict[str, tuple[int, bool]]:
    """Test set -> (records scored, whether it is in the average), from a run's extract stage."""
    extracted: ExtractOutput = read_output(run_dir, "extract", verify=False)
    predictions = read_table(stage_dir(run_dir, "extract") / ExtractOutput.files.predictions, "predictions")
    counts = Counter(predictions.column("task").to_pylist())
    return {t: (counts[t], extracted.averaged is None or t in extracted.averaged) for t in extracted.accuracy}


def results_markdown(
    table: list[dict],
    task: str,
    profile: str,
    records: dict[str, tuple[int, bool]],
    pending: dict[str, str] | None = None,
) -> str:
    tasks = list(records)
    header = [
        "method",
        "total params",
        "non-zero params",
        "MACs/token (non-zero)",
        "trainable params",
        "adapter bytes",
        *tasks,
        "average [95%]",
        "Δ vs LoRA [95%, paired]",
        "% of LoRA",
    ]
    lines = [
        f"### {task} on {profile}: every method against plain LoRA",
        "",
        "| " + " | ".join(header) + " |",
        "|---" * len(header) + "|",
    ]
    for r in table:
        count = {k: "–" if r[k] is None else f"{r[k]:,}" for k in COUNTS}
        cells = [
            r["method"],
            count["params"],
            count["nonzero_params"],
            count["nonzero_macs_per_token"],
            count["trainable_params"],
            count["adapter_bytes"],
            *accuracy_cells(r, tasks),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Accuracies in percent on the test records (reference protocol, greedy); intervals are 95% bootstrap "
        "intervals over records (stratified by test set); Δ is paired on the same records, and an interval that "
        "contains 0 means the difference is within noise.",
        "",
        "Test records: " + ", ".join(f"{t} {n}" for t, (n, _) in records.items()) + ".",
    ]
    if outside := [t for t, (_, averaged) in records.items() if not averaged]:
        lines.append(
            f"Not in the average, its interval or Δ (evaluate.outside_average): {', '.join(outside)}; its column is "
            "reported as measured."
        )
    lines += ["", "Against plain LoRA, paired on the same test records, beside what each seed reports:", ""]
    lines += reading(table)
    if any(r.get("accuracy_cloze") is not None for r in table):
        header = ["method", *tasks, "average [95%]", "Δ vs LoRA [95%, paired]", "% of LoRA"]
        lines += [
            "",
            f"#### By lm-eval's zero-shot cloze ({task} on {profile})",
            "",
            "Each option's own text after the question, no template, the likeliest taken (acc_norm where lm-eval "
            "reports it, acc for BoolQ, Social IQa and WinoGrande): what the model knows of the question, not what it "
            "learned of the answer format. The same test records, paired the same way.",
            "",
            "| " + " | ".join(header) + " |",
            "|---" * len(header) + "|",
        ]
        lines += [
            "| " + " | ".join([r["method"], *accuracy_cells(r, tasks, "_cloze")]) + " |"
            for r in table
            if r.get("accuracy_cloze") is not None
        ]
        lines += ["", *reading(table, "_cloze")]
    if pending:
        lines += ["", "Rows not run yet: " + "; ".join(f"{m} ({why})" for m, why in pending.items()) + "."]
    return "\n".join(lines) + "\n"


def accuracy_cells(r: dict, tasks: list[str], suffix: str = "") -> list[str]:
    """A row's per-task accuracies, average with its interval, Δ vs LoRA with its interval and retention, by the
    protocol whose columns end in `suffix` ("" or "_cloze")."""
    per_task = r.get(f"accuracy{suffix}_by_task") or {}
    retention = r.get(f"retention{suffix}")
    return [
        *[points(per_task.get(t)) for t in tasks],
        points_with_interval(r[f"accuracy{suffix}"], (r.get(f"accuracy{suffix}_low"), r.get(f"accuracy{suffix}_high"))),
        points_with_interval(
            r.get(f"delta{suffix}_vs_lora"), (r.get(f"delta{suffix}_low"), r.get(f"delta{suffix}_high")), signed=True
        ),
        "–" if retention is None else f"{retention:.1f}",
    ]


def reading(table: list[dict], suffix: str = "") -> list[str]:
    """The reading's lines by one protocol: LoRA against chance first, then each row against LoRA."""
    lines = []
    if (chance := next((r for r in table if r["method"] == CHANCE), None)) and chance.get(
        f"delta{suffix}_low"
    ) is not None:
        lines.append(f"- {lora_against_chance(chance, suffix)}")
    scored = [r for r in table if r["method"] not in ("lora", CHANCE) and r.get(f"accuracy{suffix}") is not None]
    lines += [f"- {verdict(r, suffix)}" for r in scored]
    return lines + [
        f"- {against_reference(r, suffix)}" for r in table if r.get(f"delta{suffix}_vs_reference") is not None
    ]


def verdict(row: dict, suffix: str = "") -> str:
    """A row's reading against LoRA from its paired interval: above, below, or not separable (contains 0)."""
    low, high = row.get(f"delta{suffix}_low"), row.get(f"delta{suffix}_high")
    if low is None:
        reading = "no paired difference"
    elif low > 0:
        reading = "above LoRA beyond noise"
    elif high < 0:
        reading = "below LoRA beyond noise"
    else:
        reading = "not separable from LoRA (the interval contains 0)"
    delta = points_with_interval(row.get(f"delta{suffix}_vs_lora"), (low, high), signed=True)
    retention = (
        "" if row.get(f"retention{suffix}") is None else f", {row[f'retention{suffix}']:.1f}% of LoRA's accuracy"
    )
    claim = f"; the seed: {SEED_CLAIMS[row['method']]}" if row["method"] in SEED_CLAIMS and not suffix else ""
    return f"**{row['method']}{' (cloze)' if suffix else ''}**: {delta} points{retention}: {reading}{claim}."


def against_reference(row: dict, suffix: str = "") -> str:
    """A row's reading against its reference row, from their paired interval: a pruned base against the dense base
    (what pruning costs before any adapter), a heuristic subnet against the subnet its method deploys (what the
    search's choice gave up, where positive)."""
    low, high = row[f"delta{suffix}_vs_reference_low"], row[f"delta{suffix}_vs_reference_high"]
    delta = points_with_interval(row[f"delta{suffix}_vs_reference"], (low, high), signed=True)
    reading = "below it beyond noise" if high < 0 else "above it beyond noise" if low > 0 else "within noise of it"
    what = "what pruning costs before any adapter" if row["reference"] == BASE else "the subnet its search chose"
    by = " (cloze)" if suffix else ""
    return f"**{row['method']}{by} against {row['reference']}**, {what}: {delta} points: {reading}."


def lora_against_chance(chance: dict, suffix: str = "") -> str:
    """Whether LoRA itself beats a uniform guess, from the chance row's paired interval: where it does not, the
    test sets measure the answer format more than the task (by the cloze: the model does not know the task), and no
    retention says whether a method keeps accuracy."""
    low, high, delta = (chance[f"delta{suffix}_{end}"] for end in ("low", "high", "vs_lora"))
    shown = points_with_interval(-delta, (-high, -low), signed=True)
    if high < 0 and suffix:
        reading = "above chance beyond noise, so the rows below measure what each method keeps of what the model knows"
    elif high < 0:
        reading = "above chance beyond noise, so the rows below measure what each method keeps of a learned task"
    elif suffix:
        reading = (
            "not above chance beyond noise: by the cloze the model does not know these tasks at this scale, and no "
            "retention below says whether a method keeps accuracy"
        )
    else:
        reading = (
            "not above chance beyond noise: at this budget the test sets measure the answer format more than the "
            "task, and no retention below says whether a method keeps accuracy"
        )
    by = " by the cloze" if suffix else ""
    return f"**lora against chance{by}** (a uniform guess among each record's options): {shown} points: {reading}."


PROTOCOLS = {"": "generated answers", "_cloze": "lm-eval's cloze"}  # accuracy column suffix -> title
# one row of panels per cost: the deployed model's column and label, the search's evaluations column and label
AXES = (
    ("nonzero_macs_per_token", "non-zero MACs per token", "macs", "MACs per token (search's count)"),
    ("nonzero_params", "non-zero parameters", "params", "adapter parameters (search's count)"),
)


def plot_study(table: list[dict], run_dirs: dict[str, Path], path: Path) -> None:
    """The papers' picture, one row of panels per cost (non-zero MACs per token, non-zero parameters): test accuracy
    by each protocol scored (95% intervals as bars; chance and LoRA as lines), and each method's searched Pareto
    front on the validation slice, by its search's objective (95% Wilson intervals)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    scored = [s for s in PROTOCOLS if any(r.get(f"accuracy{s}") is not None for r in table if r["method"] != CHANCE)]
    fig, grid = plt.subplots(
        len(AXES), len(scored) + 1, figsize=(5.5 * (len(scored) + 1) + 1.6, 4.4 * len(AXES)), layout="constrained"
    )
    placed = [
        *run_dirs,
        *(r["method"] for r in table if r["method"] not in run_dirs and r["nonzero_params"] is not None),
    ]
    colors = {name: f"C{i}" for i, name in enumerate(placed)}  # the runs' and the bases': every point drawn
    searches = {m: searched(run_dir) for m, run_dir in run_dirs.items()}
    for panels, (cost, cost_label, search_cost, search_label) in zip(grid, AXES):
        for ax, suffix in zip(panels, scored):
            deployed_panel(ax, table, suffix, cost, colors)
            ax.set(xlabel=cost_label)
        searched_panel(panels[-1], searches, search_cost, colors)
        panels[-1].set(xlabel=search_label)
        for ax in panels:
            ax.xaxis.set_major_formatter(EngFormatter(places=2))
    # one legend beside the panels, where it covers no point: the colours are the same in every panel
    fig.legend(*grid[0][0].get_legend_handles_labels(), loc="outside right upper", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def dodged(costs: list[float], share: float = 0.015) -> list[float]:
    """`costs` with the points that would overlap spread sideways: each run of costs closer than `share` of the
    axis span to the next is centred on its mean at that spacing, in the given order (the drawing is a picture; the
    table holds the counts)."""
    span = max(costs, default=0) - min(costs, default=0)
    step = share * (span or max(costs, default=0))
    order = sorted(range(len(costs)), key=lambda i: costs[i])
    runs: list[list[int]] = []
    for i in order:
        if runs and costs[i] - costs[runs[-1][-1]] < step:
            runs[-1].append(i)
        else:
            runs.append([i])
    placed = list(costs)
    for run in runs:
        centre = sum(costs[i] for i in run) / len(run)
        for k, i in enumerate(sorted(run)):
            placed[i] = centre + (k - (len(run) - 1) / 2) * step
    return placed


def deployed_panel(ax, table: list[dict], suffix: str, cost: str, colors: dict[str, str]) -> None:
    """Each deployed model's test accuracy by the protocol whose columns end in `suffix`, against `cost`; models
    of nearly the same cost are drawn side by side (`dodged`)."""
    for r in table:
        if r["method"] == CHANCE and r[f"accuracy{suffix}"] is not None:
            ax.axhline(100 * r[f"accuracy{suffix}"], color="black", linestyle="--", linewidth=1, label=CHANCE)
    # a heuristic subnet is not deployed: no counted cost to place it by
    drawn = [r for r in table if r["method"] != CHANCE and r[f"accuracy{suffix}"] is not None and r[cost] is not None]
    for r, x in zip(drawn, dodged([r[cost] for r in drawn])):
        y = r[f"accuracy{suffix}"]
        low, high = r[f"accuracy{suffix}_low"], r[f"accuracy{suffix}_high"]
        bar = None if low is None else [[100 * (y - low)], [100 * (high - y)]]
        marker = "s" if r["method"] == "lora" else "D" if r["trainable_params"] == 0 else "o"  # D: a base alone
        ax.errorbar(
            [x],
            [100 * y],
            yerr=bar,
            fmt=marker,
            capsize=4,
            markersize=8,
            color=colors[r["method"]],
            label=r["method"],
        )
        if r["method"] == "lora":
            ax.axhline(100 * y, color=colors["lora"], linestyle=":", linewidth=1)
    ax.set(ylabel="test accuracy (%)", title=f"test, by {PROTOCOLS[suffix]} (95% intervals)")


def searched(run_dir: Path) -> tuple[str, int, list[dict]]:
    """A run's search: its objective, its validation records and its Pareto front."""
    search = read_manifest(stage_dir(run_dir, "search"), "search", verify=False)
    rows = read_table(stage_dir(run_dir, "search") / SearchOutput.files.evaluations, "evaluations").to_pylist()
    objective = search.config["search"].get("objective", "generated")
    return objective, search.output.val_samples, [e for e in rows if e["pareto"]]


def searched_panel(ax, searches: dict[str, tuple], cost: str, colors: dict[str, str]) -> None:
    """Each method's searched Pareto front on validation (`searched`) against the search's `cost` ("macs" or
    "params"), by accuracy as its search scored it, with 95% Wilson intervals over its validation records."""
    for method, (_, records, front) in searches.items():
        front = sorted(front, key=lambda e: e[cost])
        x, y = [e[cost] for e in front], np.array([100 * e["accuracy"] for e in front])
        low, high = 100 * np.array([proportion_interval(e["accuracy"], records) for e in front]).T
        ax.errorbar(
            x, y, yerr=[y - low, high - y], fmt="o-", capsize=3, markersize=4, color=colors[method], label=method
        )
    objectives = sorted({objective for objective, _, _ in searches.values()})
    by = " or ".join(PROTOCOLS["_cloze" if o == "cloze" else ""] for o in objectives)
    ax.set(ylabel="validation accuracy (%)", title=f"searched Pareto fronts, by {by} (95% intervals)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.study", description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="commonsense")
    parser.add_argument("--profile", default="smollm2")
    parser.add_argument(
        "--methods", default=",".join(METHODS), help="comma-separated, lora among them; also the variants file's names"
    )
    parser.add_argument("--runs", default="runs", help="where the rows run (with their weights)")
    parser.add_argument("--results", default=str(RESULTS), help="where the rows are published and tabulated")
    parser.add_argument("--existing", action="store_true", help="run nothing; tabulate the published rows")
    parser.add_argument("--runner", default="local", choices=sorted(RUNNERS))
    parser.add_argument(
        "--pilot", action="store_true", help="only score LoRA's trained run against the dense base on validation"
    )
    parser.add_argument("--plan", action="store_true", help="check each run's config; say what would run, run nothing")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every method (none for the record)")
    try:
        args = parser.parse_intermixed_args(expand_args(sys.argv[1:] if argv is None else argv))
        if args.pilot:
            print(pilot(args.task, args.profile, Path(args.runs), Path(args.results)).read_text())
            return 0
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        out = run_study(
            args.task,
            args.profile,
            methods,
            Path(args.runs),
            args.overrides,
            args.runner,
            args.plan,
            Path(args.results),
            args.existing,
        )
    except NlsflowError as e:
        print(f"error: study: {e}", file=sys.stderr)
        return 2
    if out is None:  # --plan
        return 0
    print((out / "results.md").read_text())
    print(f"wrote {out}/results.md, results.parquet and accuracy_vs_macs.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
