"""Score a model on test sets under both protocols: LLM-Adapters' reference rules and the strict ones."""

from __future__ import annotations

import contextlib
import logging
import math
from collections import defaultdict
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from tqdm.auto import tqdm

from nlsflow.adapters.elastic import Subnet, activate
from nlsflow.adapters.shortcuts import shortcuts_off
from nlsflow.cluster import LocalPool
from nlsflow.data.datasets import EVAL_DATASETS, generate_prompt, load_eval_records
from nlsflow.evaluation.generation import evaluate_dataset, longest_first_batches
from nlsflow.evaluation.intervals import accuracy_intervals, correct_by_task, paired_difference
from nlsflow.evaluation.likelihood import rank_options
from schemas.outputs import PairedDifference

log = logging.getLogger(__name__)


def accuracy(rows: list[dict], key: str = "correct") -> float:
    return sum(r[key] for r in rows) / len(rows)


def by_source(records: list[dict]) -> dict[str, list[dict]]:
    """Validation records grouped by the test set whose scoring rule fits them, in order."""
    grouped = defaultdict(list)
    for record in records:
        grouped[record["source"]].append(record)
    return dict(grouped)


def subnet_accuracy(
    model,
    tokenizer,
    space,
    records: list[dict],
    subnet: Subnet,
    *,
    max_new_tokens: int,
    num_beams: int,
    batch_size: int,
    progress: bool = True,
) -> float:
    """Validation accuracy of `subnet`, as the search stage scores it: per source set, batched generation."""
    activate(model, space, subnet)
    correct = 0
    for source, rows in by_source(records).items():
        scored = evaluate_dataset(
            model,
            tokenizer,
            EVAL_DATASETS[source],
            rows,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            batch_size=batch_size,
            progress=progress,
        )
        correct += sum(r["correct"] for r in scored)
    return correct / len(records)


@dataclass(frozen=True)
class Shard:
    """Whole generation batches of one test set, cut from the longest-first order a single process uses: each
    batch (and so its padding) is the one it would be unsharded, and the rows come out identical."""

    model: str  # which of the pool's models scores it (`workers.TestSetScorer.models`)
    dataset: str
    adapter_off: bool  # score the base without its adapter (and HeteroLoRA's shortcuts)
    positions: list[int]  # the records' places in the test set
    records: list[dict]


def test_set_shards(
    tokenizer, records: dict[str, list[dict]], batch_size: int, parts: int, model: str, adapter_off: bool = False
) -> list[Shard]:
    """Each set's records in up to `parts` shards of whole batches."""
    shards = []
    for name, rows in records.items():
        prompts = [generate_prompt(r["instruction"], r.get("input", "")) for r in rows]
        batches = longest_first_batches(tokenizer, prompts, batch_size)
        per_shard = math.ceil(len(batches) / parts)
        for start in range(0, len(batches), per_shard):
            positions = [i for batch in batches[start : start + per_shard] for i in batch]
            shards.append(Shard(model, name, adapter_off, positions, [rows[i] for i in positions]))
    return shards


def validation_accuracy_pool(pool, tokenizer, records: list[dict], batch_size: int):
    """The search's accuracy pool (`search.nsga2.AccuracyPool`) on a scoring pool whose scorer answers a
    (subnet, `Shard`) with its correct answers (`workers.SubnetScorer`).

    A generation's subnets go out together, each subnet's validation records cut (in whole batches, per source
    set, as `subnet_accuracy` batches them) into about 4 items per worker: a generation's last items finish close
    together, and 64 workers speed up a population of 5. A subnet's accuracy is yielded when its last shard is
    back."""
    sources = by_source(records)

    def score(subnets: list[Subnet]):
        if not subnets:  # a generation answered from the cache
            return
        parts = 1 if pool.workers == 1 else math.ceil(4 * pool.workers / (len(subnets) * len(sources)))
        shards = test_set_shards(tokenizer, sources, batch_size, parts, "supernet")
        correct, seconds, left = [0] * len(subnets), [0.0] * len(subnets), [len(shards)] * len(subnets)
        for i, found, spent in pool([(subnet, shard) for subnet in subnets for shard in shards]):
            k = i // len(shards)
            correct[k], seconds[k], left[k] = correct[k] + found, seconds[k] + spent, left[k] - 1
            if not left[k]:
                yield k, correct[k] / len(records), seconds[k]

    return score


def score_test_sets(
    pool, tokenizer, data_root: Path, eval_cfg, model_name: str, model: str = "model", adapter_off: bool = False
) -> tuple[list[dict], dict]:
    """Every test set of `eval_cfg`, scored in shards by `pool` (`nlsflow.cluster`; its scorer answers a `Shard`
    with its rows); rows are tagged with `model_name` and come in test-set order, whatever the number of workers.

    Returns the prediction rows and {"accuracy": {task: acc}, "accuracy_strict": {...}, "average_accuracy": ...,
    "average_accuracy_strict": ..., "averaged": [task, ...], "accuracy_interval": {task: (low, high)},
    "average_accuracy_interval": ...} (95% bootstrap intervals of the reference accuracies,
    `nlsflow.evaluation.intervals`); the averages span `eval_cfg.averaged`. Where every set is multiple choice, also
    "accuracy_cloze", "average_accuracy_cloze" and their intervals: lm-eval's zero-shot cloze (`predict`).
    """
    records = {name: load_eval_records(data_root, name, eval_cfg.max_samples) for name in eval_cfg.datasets}
    parts = 1 if pool.workers == 1 else 4 * pool.workers  # about 4 shards per worker: they finish close together
    shards = test_set_shards(tokenizer, records, eval_cfg.generation.batch_size, parts, model, adapter_off)
    found = {name: [None] * len(rows) for name, rows in records.items()}
    with tqdm(total=sum(map(len, records.values())), desc=f"{model_name} on the test sets", unit="record") as bar:
        for i, rows, _ in pool(shards):
            shard = shards[i]
            for position, row in zip(shard.positions, rows):
                found[shard.dataset][position] = {"model": model_name, **row, "index": position}
            bar.update(len(rows))
    reference, strict = {}, {}
    for name, task_rows in found.items():
        reference[name], strict[name] = accuracy(task_rows), accuracy(task_rows, "strict_correct")
        log.info(
            "%s on %s: accuracy %.4f (strict %.4f), %d records",
            model_name,
            name,
            reference[name],
            strict[name],
            len(task_rows),
        )
    averaged = eval_cfg.averaged
    per_set, average = accuracy_intervals(
        {name: [r["correct"] for r in task_rows] for name, task_rows in found.items()}, averaged
    )
    scores = {
        "accuracy": reference,
        "accuracy_strict": strict,
        "average_accuracy": sum(reference[n] for n in averaged) / len(averaged),
        "average_accuracy_strict": sum(strict[n] for n in averaged) / len(averaged),
        "averaged": averaged,
        "accuracy_interval": per_set,
        "average_accuracy_interval": average,
    }
    if all("cloze_correct" in r for task_rows in found.values() for r in task_rows):  # every set multiple choice
        clozed = {name: [r["cloze_correct"] for r in task_rows] for name, task_rows in found.items()}
        cloze = {name: sum(answers) / len(answers) for name, answers in clozed.items()}
        cloze_per_set, cloze_average = accuracy_intervals(clozed, averaged)
        log.info("%s by lm-eval's cloze: %s", model_name, ", ".join(f"{n} {a:.4f}" for n, a in cloze.items()))
        scores |= {
            "accuracy_cloze": cloze,
            "average_accuracy_cloze": sum(cloze[n] for n in averaged) / len(averaged),
            "accuracy_cloze_interval": cloze_per_set,
            "average_accuracy_cloze_interval": cloze_average,
        }
    return [row for task_rows in found.values() for row in task_rows], scores


def evaluate_test_sets(
    model, tokenizer, data_root: Path, eval_cfg, model_name: str, decoder=None
) -> tuple[list[dict], dict]:
    """`score_test_sets` in this process, with `model` (or, `model` None, greedy through a `decoder`:
    `nlsflow.deploy.timing.Decoder`)."""
    score = partial(predict, model, tokenizer, generation=eval_cfg.generation, decoder=decoder)
    return score_test_sets(LocalPool(lambda: score), tokenizer, data_root, eval_cfg, model_name)


def paired_differences(
    rows: list[dict], pairs: list[tuple[str, str]], averaged: list[str] | None, key: str = "correct"
) -> dict[str, PairedDifference]:
    """'<a> - <b>' -> the paired difference of each pair of models on the same records, from their prediction rows
    (`score_test_sets`), by the rows' `key`: "correct", or "cloze_correct" (for the pairs both were scored by)."""
    answers = {}
    for name in dict.fromkeys(name for pair in pairs for name in pair):
        mine = [r for r in rows if r["model"] == name]
        if not mine:
            raise ValueError(f"no prediction rows of model {name!r} to pair")
        if all(r.get(key) is not None for r in mine):
            answers[name] = correct_by_task(mine, averaged, key)
    differences = {}
    for first, second in pairs:
        if first in answers and second in answers:
            difference, interval, per_set = paired_difference(answers[first], answers[second])
            differences[f"{first} - {second}"] = PairedDifference(
                difference=difference, interval=interval, per_set={k: d for k, (d, _) in per_set.items()}
            )
    return differences


def predict(model, tokenizer, shard: Shard, generation, decoder=None, cloze: bool = True) -> list[dict]:
    """A shard's prediction rows, with the adapter (and HeteroLoRA's shortcuts) off when the shard asks. With
    `cloze`, a multiple-choice set's rows also hold lm-eval's zero-shot cloze answer (`cloze_prediction`,
    `cloze_correct`: `likelihood.rank_options`), scored by the same model (not through a `decoder`, which only
    generates)."""
    adapter_off = contextlib.ExitStack()
    if shard.adapter_off:
        adapter_off.enter_context(model.disable_adapter())
        adapter_off.enter_context(shortcuts_off(model))
    with adapter_off:
        rows = evaluate_dataset(
            model,
            tokenizer,
            EVAL_DATASETS[shard.dataset],
            shard.records,
            max_new_tokens=generation.max_new_tokens,
            num_beams=generation.num_beams,
            batch_size=generation.batch_size,
            progress=False,
            decoder=decoder,
        )
        if cloze and model is not None and EVAL_DATASETS[shard.dataset].kind == "choice":
            ranked = rank_options(
                model, tokenizer, shard.records, shard.dataset, batch_size=generation.batch_size, progress=False
            )
            for row, option in zip(rows, ranked):
                row.update(cloze_prediction=option["cloze_prediction"], cloze_correct=option["cloze_correct"])
    return rows
