"""Score a model on test sets under both protocols: LLM-Adapters' reference rules and the strict ones."""
from __future__ import annotations

import logging
from pathlib import Path

from nlsflow.data import EVAL_DATASETS, load_eval_records
from nlsflow.generation import evaluate_dataset

log = logging.getLogger(__name__)


def accuracy(rows: list[dict], key: str = "correct") -> float:
    return sum(r[key] for r in rows) / len(rows)


def evaluate_test_sets(model, tokenizer, data_root: Path, eval_cfg, model_name: str) -> tuple[list[dict], dict]:
    """Generate and score every test set of `eval_cfg`; rows are tagged with `model_name`.

    Returns the prediction rows and {"accuracy": {task: acc}, "accuracy_strict": {...}, "average_accuracy": ...,
    "average_accuracy_strict": ...}.
    """
    gen = eval_cfg.generation
    rows, reference, strict = [], {}, {}
    for name in eval_cfg.datasets:
        records = load_eval_records(data_root, name, eval_cfg.max_samples)
        task_rows = evaluate_dataset(model, tokenizer, EVAL_DATASETS[name], records, max_new_tokens=gen.max_new_tokens,
                                     num_beams=gen.num_beams, batch_size=gen.batch_size)
        reference[name], strict[name] = accuracy(task_rows), accuracy(task_rows, "strict_correct")
        log.info("%s on %s: accuracy %.4f (strict %.4f), %d records", model_name, name, reference[name], strict[name],
                 len(task_rows))
        rows += [{"model": model_name, **r} for r in task_rows]
    return rows, {"accuracy": reference, "accuracy_strict": strict,
                  "average_accuracy": sum(reference.values()) / len(reference),
                  "average_accuracy_strict": sum(strict.values()) / len(strict)}
