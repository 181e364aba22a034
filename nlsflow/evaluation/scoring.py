"""Score a model on test sets under both protocols: LLM-Adapters' reference rules and the strict ones."""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

from nlsflow.adapters.elastic import Subnet, activate
from nlsflow.data.datasets import EVAL_DATASETS, load_eval_records
from nlsflow.evaluation.generation import evaluate_dataset

log = logging.getLogger(__name__)


def accuracy(rows: list[dict], key: str = "correct") -> float:
    return sum(r[key] for r in rows) / len(rows)


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
    by_source = defaultdict(list)
    for record in records:
        by_source[record["source"]].append(record)
    correct = 0
    for source, rows in by_source.items():
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


def evaluate_test_sets(
    model, tokenizer, data_root: Path, eval_cfg, model_name: str, decoder=None
) -> tuple[list[dict], dict]:
    """Generate and score every test set of `eval_cfg`; rows are tagged with `model_name`.

    With a `decoder` (`nlsflow.deploy.timing.Decoder`, `model` None) generation is greedy through it. Returns the
    prediction rows and {"accuracy": {task: acc}, "accuracy_strict": {...}, "average_accuracy": ...,
    "average_accuracy_strict": ...}.
    """
    gen = eval_cfg.generation
    rows, reference, strict = [], {}, {}
    for name in eval_cfg.datasets:
        records = load_eval_records(data_root, name, eval_cfg.max_samples)
        task_rows = evaluate_dataset(
            model,
            tokenizer,
            EVAL_DATASETS[name],
            records,
            max_new_tokens=gen.max_new_tokens,
            num_beams=gen.num_beams,
            batch_size=gen.batch_size,
            decoder=decoder,
        )
        reference[name], strict[name] = accuracy(task_rows), accuracy(task_rows, "strict_correct")
        log.info(
            "%s on %s: accuracy %.4f (strict %.4f), %d records",
            model_name,
            name,
            reference[name],
            strict[name],
            len(task_rows),
        )
        rows += [{"model": model_name, **r} for r in task_rows]
    return rows, {
        "accuracy": reference,
        "accuracy_strict": strict,
        "average_accuracy": sum(reference.values()) / len(reference),
        "average_accuracy_strict": sum(strict.values()) / len(strict),
    }
