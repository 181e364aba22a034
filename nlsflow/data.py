"""Training and evaluation data in the LLM-Adapters record format.

A record is a dict with `instruction`, `input` (always "" here), `output` and `answer`; `answer` is
the label, `output` the training target. Paths are relative to a data root laid out like
/work/shared/data (see its README): `llm-adapters/dataset/<name>/{train,test}.json`,
`gsm8k/...`, `wikitext-2/{valid,test}.txt`.
"""
from __future__ import annotations

import json
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

logger = logging.getLogger(__name__)

# LLM-Adapters writes its template as an f-string inside a function, so every line after the
# header carries the 16 spaces of the code's indentation; blank lines between sections do too.
_INDENT = " " * 16


def generate_prompt(instruction: str, input: str = "", output: str = "") -> str:
    """Alpaca-style prompt, byte for byte as LLM-Adapters' finetune.py `generate_prompt` builds it.

    Without input (`·` is a space, `⏎` a newline; the header is one line ending in two spaces):

        Below is an instruction that describes a task. Write a response that appropriately
            completes the request.··⏎
        ⏎
        ················### Instruction:⏎
        ················{instruction}⏎
        ················⏎
        ················### Response:⏎
        ················{output}

    With input the header reads "..., paired with an input that provides further context. Write a
    response that appropriately completes the request." plus ONE trailing space, and
    "⏎················⏎················### Input:⏎················{input}" follows the instruction.

    The evaluation prompt is the same text with `output=""`, so it ends in "### Response:⏎" and 16
    spaces. LLM-Adapters' own evaluate.py / commonsense_evaluate.py differ in whitespace (one
    trailing space, none with input, and empty blank lines); we use the training template for both.
    """
    if input:
        header = (
            "Below is an instruction that describes a task, paired with an input that provides further "
            "context. Write a response that appropriately completes the request. "
        )
        sections = ["### Instruction:", instruction, "", "### Input:", input]
    else:
        header = (
            "Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.  "
        )
        sections = ["### Instruction:", instruction]
    lines = [*sections, "", "### Response:", output]
    return header + "\n\n" + "\n".join(_INDENT + line for line in lines)


@dataclass(frozen=True)
class EvalDataset:
    """One test set and how its generations are scored (see `nlsflow.answers`)."""

    name: str
    path: str  # relative to the data root
    kind: Literal["numeric", "aqua", "choice"]
    keywords: tuple[str, ...] = ()  # choice tasks: the labels LLM-Adapters searches the generation for


def _test_set(name: str, kind: str = "numeric", keywords: tuple[str, ...] = ()) -> EvalDataset:
    return EvalDataset(name, f"llm-adapters/dataset/{name}/test.json", kind, keywords)


_ANSWERS = ("answer1", "answer2", "answer3", "answer4", "answer5")

# Keyword sets as LLM-Adapters' commonsense_evaluate.py `extract_answer` matches them.
EVAL_DATASETS: dict[str, EvalDataset] = {
    d.name: d
    for d in (
        _test_set("gsm8k"),
        _test_set("AQuA", "aqua"),
        _test_set("mawps"),
        _test_set("SVAMP"),
        _test_set("AddSub"),
        _test_set("MultiArith"),
        _test_set("SingleEq"),
        _test_set("boolq", "choice", ("true", "false")),
        _test_set("piqa", "choice", ("solution1", "solution2")),
        _test_set("social_i_qa", "choice", _ANSWERS),
        # Only 36 records of LLM-Adapters' HellaSwag test file are available offline.
        EvalDataset("hellaswag", "llm-adapters/dataset/hellaswag/test_subset36.json", "choice",
                    ("ending1", "ending2", "ending3", "ending4")),
        _test_set("winogrande", "choice", ("option1", "option2")),
        _test_set("ARC-Easy", "choice", _ANSWERS),
        _test_set("ARC-Challenge", "choice", _ANSWERS),
        _test_set("openbookqa", "choice", _ANSWERS),
    )
}

TASK_EVAL_SETS: dict[str, tuple[str, ...]] = {
    "math": ("gsm8k", "AQuA", "mawps", "SVAMP"),
    "commonsense": ("boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge",
                    "openbookqa"),
}

# Training files per task, each with the test set whose scoring rule fits its answers (the record's `source`).
# Never LLM-Adapters' ft-training_set/math_data.json: its questions come from the test sets.
TRAIN_SETS: dict[str, dict[str, str]] = {
    "math": {"gsm8k": "gsm8k/gsm8k_train_llm_adapters_format.json", "mawps": "llm-adapters/dataset/mawps/trainset.json"},
    "commonsense": {name: f"llm-adapters/dataset/{name}/train.json"
                    for name in ("boolq", "ARC-Easy", "ARC-Challenge", "openbookqa")},
}


def load_records(data_root: Path, relpath: str) -> list[dict]:
    """Read a JSON list or a JSONL file of records from `data_root / relpath`."""
    path = Path(data_root) / relpath
    if not path.is_file():
        raise FileNotFoundError(f"missing data file {path}: put it under {data_root} or set data_root=... to "
                                f"the folder that holds {relpath}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        records = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); replace it with a fresh copy") from None
    if not isinstance(records, list):
        raise ValueError(f"{path} holds a JSON {type(records).__name__}, expected a list of records")
    return records


def load_eval_records(data_root: Path, name: str, max_samples: int | None = None) -> list[dict]:
    """The first `max_samples` records (all when None) of test set `name`, in file order."""
    if name not in EVAL_DATASETS:
        raise ValueError(f"unknown eval dataset {name!r}; choose from {sorted(EVAL_DATASETS)}")
    records = load_records(data_root, EVAL_DATASETS[name].path)
    return records if max_samples is None else records[:max_samples]


def normalize_question(text: str) -> str:
    """Lowercased, whitespace collapsed: the key used to find a test question among training data."""
    return " ".join(text.lower().split())


def load_train_records(data_root: Path, task: str) -> list[dict]:
    """All training records of `task`, MAWPS converted, minus questions that its test sets ask.

    Each record gains `source`: the EVAL_DATASETS name whose scoring rule fits it (for validation).
    De-contamination compares `normalize_question(instruction)` against every test set in
    `TASK_EVAL_SETS[task]`. On the shipped data this drops 27 MAWPS train records (MAWPS test) for
    math and 2 ARC-Easy train records for commonsense.
    """
    if task not in TRAIN_SETS:
        raise ValueError(f"unknown task {task!r}; choose from {sorted(TRAIN_SETS)}")
    test_questions = {
        normalize_question(record["instruction"])
        for name in TASK_EVAL_SETS[task]
        for record in load_eval_records(data_root, name)
    }
    kept: list[dict] = []
    for source, relpath in TRAIN_SETS[task].items():
        records = [_from_mawps(r) if "original_text" in r else r for r in load_records(data_root, relpath)]
        records = [{**r, "source": source} for r in records]
        clean = [r for r in records if normalize_question(r["instruction"]) not in test_questions]
        logger.info("%s: %d records, %d dropped as test questions", relpath, len(records), len(records) - len(clean))
        kept += clean
    return kept


def _from_mawps(raw: dict) -> dict:
    """A raw MAWPS record (`original_text`, `equation`, `ans`) as an LLM-Adapters record."""
    answer = _format_number(float(raw["ans"]))
    equation = raw["equation"].strip()
    unknown, _, expression = equation.partition("=")
    if unknown.strip().isalpha() and not re.search(r"[A-Za-z]", expression):
        solution = f"{expression.strip()} = {answer}"  # e.g. "X=((22.0-14.0)/4.0)"
    else:
        solution = f"Solving {equation} gives {answer}"  # an equation in the unknown, e.g. "X-6=52"
    return {"instruction": raw["original_text"].strip(), "input": "",
            "output": f"{solution}. The answer is {answer}.", "answer": str(raw["ans"])}


def _format_number(value: float) -> str:
    """2.0 -> "2", 10.333333333333334 -> "10.3333" (within the 0.001 that scoring allows)."""
    if value.is_integer():
        return str(int(value))
    return f"{round(value, 4):f}".rstrip("0").rstrip(".")


def split_validation(records: list[dict], val_size: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Shuffle with `seed` and hold out `val_size` records: (train, validation), both in shuffled order."""
    if not 0 < val_size < len(records):
        raise ValueError(f"val_size={val_size} must be between 1 and {len(records) - 1} for {len(records)} records")
    shuffled = list(records)
    random.Random(seed).shuffle(shuffled)
    return shuffled[val_size:], shuffled[:val_size]


def tokenize_for_training(tokenizer, record: dict, cutoff_len: int, train_on_inputs: bool) -> dict[str, list[int]]:
    """Tokenize a record as LLM-Adapters' finetune.py does (`generate_and_tokenize_prompt`).

    Truncate to `cutoff_len`; append EOS when the text did not already end in EOS and there is room.
    With `train_on_inputs=False` the first n labels become -100, n being the token count of the
    prompt alone (tokenized separately, no EOS), so a token that merges across the prompt/response
    boundary shifts the mask by one; we keep that behaviour.
    """
    prompt = generate_prompt(record["instruction"], record.get("input", ""))
    full = tokenizer(prompt + record["output"], truncation=True, max_length=cutoff_len)
    input_ids, attention_mask = list(full["input_ids"]), list(full["attention_mask"])
    if input_ids and input_ids[-1] != tokenizer.eos_token_id and len(input_ids) < cutoff_len:
        input_ids.append(tokenizer.eos_token_id)
        attention_mask.append(1)
    labels = list(input_ids)
    if not train_on_inputs:
        prompt_len = min(len(tokenizer(prompt, truncation=True, max_length=cutoff_len)["input_ids"]), len(labels))
        labels[:prompt_len] = [-100] * prompt_len
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def wikitext2(data_root: Path, split: Literal["valid", "test"]) -> str:
    """Raw WikiText-2 text: `valid` for pruning calibration, `test` for perplexity only."""
    if split not in ("valid", "test"):
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    path = Path(data_root) / "wikitext-2" / f"{split}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"missing data file {path}: put it under {data_root} or set data_root=...")
    return path.read_text(encoding="utf-8")


def calibration_text(data_root: Path) -> str:
    """Pruning calibration text. Wanda samples C4 train; offline we use WikiText-2 valid instead."""
    return wikitext2(data_root, "valid")
