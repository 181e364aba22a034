"""Training and evaluation data in the LLM-Adapters record format, and the text that pruning calibrates on.

A record is a dict with `instruction`, `input` (always "" here), `output` and `answer`; `answer` is the label,
`output` the training target. Every file is reached through `nlsflow.data.registry` by name (checked, fetched when
missing); paths are relative to a data root laid out like /work/shared/data (see its README).
"""

from __future__ import annotations

import logging
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from nlsflow.data.registry import DATA_FILES, read_records, resolve_data_file
from nlsflow.errors import NlsflowError

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
    """One test set and how its generations are scored (see `nlsflow.evaluation.answers`)."""

    name: str
    path: str  # relative to the data root: the registry's `<name>_test` file
    kind: Literal["numeric", "aqua", "choice"]
    keywords: tuple[str, ...] = ()  # choice tasks: the labels LLM-Adapters searches the generation for


def _test_set(name: str, kind: str = "numeric", keywords: tuple[str, ...] = ()) -> EvalDataset:
    return EvalDataset(name, DATA_FILES[f"{name}_test"].path, kind, keywords)


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
        # Only 36 records of LLM-Adapters' HellaSwag test file are available offline (registry: hellaswag_test).
        _test_set("hellaswag", "choice", ("ending1", "ending2", "ending3", "ending4")),
        _test_set("winogrande", "choice", ("option1", "option2")),
        _test_set("ARC-Easy", "choice", _ANSWERS),
        _test_set("ARC-Challenge", "choice", _ANSWERS),
        _test_set("openbookqa", "choice", _ANSWERS),
    )
}

TASK_EVAL_SETS: dict[str, tuple[str, ...]] = {
    "math": ("gsm8k", "AQuA", "mawps", "SVAMP"),
    "commonsense": (
        "boolq",
        "piqa",
        "social_i_qa",
        "hellaswag",
        "winogrande",
        "ARC-Easy",
        "ARC-Challenge",
        "openbookqa",
    ),
}

# Registered training sets per task when none are named: what exists offline. Online, ("math_10k",) and
# ("commonsense_170k",) reproduce LLM-Adapters. Never LLM-Adapters' math_data.json: its questions are test questions.
TRAIN_DEFAULTS: dict[str, tuple[str, ...]] = {
    "math": ("gsm8k_train", "mawps_train"),
    "commonsense": (
        "boolq_train",
        "piqa_train",
        "social_i_qa_train",
        "winogrande_train",
        "ARC-Easy_train",
        "ARC-Challenge_train",
        "openbookqa_train",
    ),
}


class ContaminationError(NlsflowError, ValueError):
    """Training records ask test questions and the caller chose to refuse them."""


def load_records(data_root: Path, relpath: str) -> list[dict]:
    """Read a JSON list, a JSON-lines or a gzipped JSON-lines file of records from `data_root / relpath`."""
    path = Path(data_root) / relpath
    if not path.is_file():
        raise FileNotFoundError(
            f"missing data file {path}: put it under {data_root} or set data.root=... to "
            f"the folder that holds {relpath}"
        )
    return read_records(path)


def load_eval_records(
    data_root: Path, name: str, max_samples: int | None = None, *, download: bool = True
) -> list[dict]:
    """The first `max_samples` records (all when None) of test set `name`, in file order."""
    if name not in EVAL_DATASETS:
        raise ValueError(f"unknown eval dataset {name!r}; choose from {sorted(EVAL_DATASETS)}")
    records = read_records(resolve_data_file(data_root, f"{name}_test", download=download))
    return records if max_samples is None else records[:max_samples]


def normalize_question(text: str) -> str:
    """Lowercased, whitespace collapsed."""
    return " ".join(text.lower().split())


def question_key(text: str) -> str:
    """The key that finds a test question among training data: `normalize_question` without punctuation.

    Punctuation and its spacing are dropped because the copies differ there: MAWPS train writes "6 days . How"
    and "part - time" where the SingleEq, MultiArith and AddSub test files write "6 days. How" and "part-time".
    """
    return " ".join(re.findall(r"\w+", text.lower()))


def _question(record: dict) -> str:
    """The question of a record in any registered format (LLM-Adapters, GSM8K jsonl, raw MAWPS)."""
    for field in ("instruction", "question", "original_text"):
        if field in record:
            return record[field]
    raise ValueError(f"record has no question field (instruction, question or original_text): {sorted(record)}")


def infer_source(answer: str) -> str:
    """The first EVAL_DATASETS name whose scoring accepts label `answer`: a number -> gsm8k, a letter A-E -> AQuA,
    true/false -> boolq, solutionN -> piqa, answerN -> social_i_qa, endingN -> hellaswag, optionN -> winogrande."""
    label = str(answer).strip()
    for dataset in EVAL_DATASETS.values():
        if dataset.kind == "choice" and label.lower() in dataset.keywords:
            return dataset.name
        if dataset.kind == "aqua" and len(label) == 1 and label in "ABCDE":
            return dataset.name
        if dataset.kind == "numeric" and _is_number(label):
            return dataset.name
    raise ValueError(
        f"no evaluation set scores the answer {label!r}: expected a number, a letter A-E, true/false "
        "or answerN, solutionN, endingN, optionN"
    )


def _is_number(label: str) -> bool:
    try:
        return math.isfinite(float(label.replace(",", "")))
    except ValueError:
        return False


def load_train_records(data_root: Path, names: Sequence[str] | str, *, download: bool = True) -> list[dict]:
    """The records of registered training sets `names`, in order, MAWPS converted, each with its `source`.

    `source` is the EVAL_DATASETS name whose scoring rule fits the record (used for validation): the set's own for
    single-task sets, inferred from each answer for mixed ones (math_10k, commonsense_*). A task name ("math",
    "commonsense") stands for `TRAIN_DEFAULTS[task]`. Nothing is filtered here: see `check_contamination`.
    """
    if isinstance(names, str):
        names = TRAIN_DEFAULTS.get(names, (names,))
    if not names:
        raise ValueError("no training sets named; choose from " + ", ".join(_train_names()))
    records: list[dict] = []
    for name in names:
        if name not in DATA_FILES or DATA_FILES[name].role != "train":
            raise ValueError(f"unknown training set {name!r}; choose from {', '.join(_train_names())}")
        entry = DATA_FILES[name]
        raw = read_records(resolve_data_file(data_root, name, download=download))
        converted = [_from_mawps(r) if "original_text" in r else r for r in raw]
        for i, record in enumerate(converted):
            try:
                source = entry.source or infer_source(record["answer"])
            except ValueError as err:
                raise ValueError(f"{name} record {i}: {err}") from None
            records.append({**record, "source": source})
        logger.info("%s: %d records", name, len(converted))
    return records


def _train_names() -> list[str]:
    return [f.name for f in DATA_FILES.values() if f.role == "train"]


def check_contamination(
    records: list[dict], data_root: Path, *, mode: Literal["refuse", "drop"]
) -> tuple[list[dict], dict]:
    """Find training records whose question a registered test set asks; refuse them or drop them.

    Questions are compared by `question_key` against every registered test set present under `data_root`
    (missing ones are skipped and listed; nothing is downloaded). Returns the kept records and a report
    {"checked": [test sets], "skipped": [...], "overlaps": {test set: training records asking its questions},
    "dropped": records dropped}; a record in several test sets counts in each but is dropped once. Mode "refuse"
    raises ContaminationError (one line) when anything overlaps.
    """
    if mode not in ("refuse", "drop"):
        raise ValueError(f"mode must be 'refuse' or 'drop', got {mode!r}")
    keys = [question_key(_question(r)) for r in records]
    checked, skipped, overlaps = [], [], {}
    contaminated: set[int] = set()
    for entry in DATA_FILES.values():
        if entry.role != "test":
            continue
        if not (Path(data_root) / entry.path).is_file():
            skipped.append(entry.name)
            continue
        test_keys = {
            question_key(_question(r)) for r in read_records(resolve_data_file(data_root, entry.name, download=False))
        }
        checked.append(entry.name)
        hits = [i for i, key in enumerate(keys) if key in test_keys]
        if hits:
            overlaps[entry.name] = len(hits)
            contaminated.update(hits)
    report = {"checked": checked, "skipped": skipped, "overlaps": overlaps, "dropped": 0}
    if contaminated and mode == "refuse":
        counts = ", ".join(f"{name} {count}" for name, count in overlaps.items())
        raise ContaminationError(
            f"{len(contaminated)} training records ask test questions ({counts}): set "
            "data.contamination=drop to drop and report them"
        )
    report["dropped"] = len(contaminated)
    if skipped:
        logger.info("contamination check: %d test sets not present, skipped: %s", len(skipped), ", ".join(skipped))
    if contaminated:
        logger.info(
            "contamination check: dropped %d of %d training records (%s)",
            len(contaminated),
            len(records),
            ", ".join(f"{name} {count}" for name, count in overlaps.items()),
        )
    return [r for i, r in enumerate(records) if i not in contaminated], report


def _from_mawps(raw: dict) -> dict:
    """A raw MAWPS record (`original_text`, `equation`, `ans`) as an LLM-Adapters record."""
    answer = _format_number(float(raw["ans"]))
    equation = raw["equation"].strip()
    unknown, _, expression = equation.partition("=")
    if unknown.strip().isalpha() and not re.search(r"[A-Za-z]", expression):
        solution = f"{expression.strip()} = {answer}"  # e.g. "X=((22.0-14.0)/4.0)"
    else:
        solution = f"Solving {equation} gives {answer}"  # an equation in the unknown, e.g. "X-6=52"
    return {
        "instruction": raw["original_text"].strip(),
        "input": "",
        "output": f"{solution}. The answer is {answer}.",
        "answer": str(raw["ans"]),
    }


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


def tokenize_for_training(
    tokenizer, record: dict, cutoff_len: int, train_on_inputs: bool, tokenize: Literal["split", "joint"] = "split"
) -> dict[str, list[int]]:
    """Tokenize a record for training, as LLM-Adapters' finetune.py does (`generate_and_tokenize_prompt`) but for
    where the prompt ends.

    `tokenize="split"`: the prompt is tokenized alone, exactly as evaluation tokenizes it, and the response's
    tokens follow. `"joint"` (LLM-Adapters): prompt + response as one text. The template ends the prompt in 16
    spaces, so a byte-level BPE tokenizer joins the last of them to the response's first word (" the"): trained
    jointly, such a model never sees the prompt's last token as evaluation gives it, and answers off-format.
    Truncate to `cutoff_len`; append EOS when the text did not already end in EOS and there is room.
    With `train_on_inputs=False` the first n labels become -100, n being the token count of the
    prompt alone (tokenized separately, no EOS); jointly, a token that merges across the boundary
    shifts the mask by one, as in LLM-Adapters.
    """
    prompt = generate_prompt(record["instruction"], record.get("input", ""))
    prompt_ids = tokenizer(prompt)["input_ids"]
    if tokenize == "split":
        input_ids = (prompt_ids + tokenizer(record["output"], add_special_tokens=False)["input_ids"])[:cutoff_len]
    else:
        input_ids = list(tokenizer(prompt + record["output"], truncation=True, max_length=cutoff_len)["input_ids"])
    if input_ids and input_ids[-1] != tokenizer.eos_token_id and len(input_ids) < cutoff_len:
        input_ids.append(tokenizer.eos_token_id)
    attention_mask = [1] * len(input_ids)
    labels = list(input_ids)
    if not train_on_inputs:
        prompt_len = min(len(prompt_ids), cutoff_len, len(labels))
        labels[:prompt_len] = [-100] * prompt_len
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def wikitext2(data_root: Path, split: Literal["valid", "test"], *, download: bool = True) -> str:
    """WikiText-2 text (the tokenized v1 files, with <unk>): `valid` for pruning calibration, `test` for perplexity."""
    if split not in ("valid", "test"):
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    return resolve_data_file(data_root, f"wikitext2_{split}", download=download).read_text(encoding="utf-8")


def calibration_documents(
    data_root: Path,
    source: Literal["wikitext2", "task", "c4"],
    *,
    train_names: Sequence[str] = (),
    contamination: Literal["refuse", "drop"] = "drop",
    download: bool = True,
) -> list[str]:
    """The text pruning calibrates on, as documents for `calibration_batch`.

    wikitext2: the validation text as one document. task: one document, the prompts of training sets
    `train_names` with their outputs (`generate_prompt`), minus test questions (`check_contamination` in
    `contamination` mode), joined by blank lines. c4: every document of the C4 shard Wanda samples (downloaded,
    about 356k documents, roughly 1 GB of text in memory).
    """
    if source == "wikitext2":
        return [wikitext2(data_root, "valid", download=download)]
    if source == "task":
        if not train_names:
            raise ValueError("calibration source 'task' needs train_names (e.g. data.train_sets)")
        records, _ = check_contamination(
            load_train_records(data_root, train_names, download=download), data_root, mode=contamination
        )
        return ["\n\n".join(generate_prompt(r["instruction"], r.get("input", ""), r["output"]) for r in records)]
    if source == "c4":
        path = resolve_data_file(data_root, "c4_train_shard", download=download)
        return [record["text"] for record in read_records(path)]
    raise ValueError(f"calibration source must be 'wikitext2', 'task' or 'c4', got {source!r}")


def calibration_batch(
    tokenizer, documents: Sequence[str] | str, num_samples: int, seqlen: int, seed: int
) -> torch.Tensor:
    """`num_samples` windows of `seqlen` tokens, LongTensor [num_samples, seqlen], the same for the same seed.

    One document: random windows of it. Several: Wanda's `get_c4` procedure, draw for draw (random.Random(seed)
    in place of the global seed): pick a random document, again until one has more than `seqlen` tokens, then a
    random window of it. Tokenized without special tokens (Wanda's LLaMA tokenizer prepends BOS, so only a window
    at position 0 differs).
    """
    if isinstance(documents, str):
        documents = [documents]
    if not documents:
        raise ValueError("no calibration documents")
    rng = random.Random(seed)

    def encode(text: str) -> torch.Tensor:
        return tokenizer(text, return_tensors="pt", add_special_tokens=False, verbose=False).input_ids[0]

    if len(documents) == 1:
        ids = encode(documents[0])
        if ids.numel() <= seqlen:
            raise ValueError(
                f"calibration text has {ids.numel()} tokens, not more than seqlen={seqlen}; lower "
                "prune.calibration.seqlen or calibrate on a longer source"
            )
        starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(num_samples)]
        return torch.stack([ids[s : s + seqlen] for s in starts])

    long_docs: dict[int, torch.Tensor] = {}
    lengths: dict[int, int] = {}  # every document tokenized so far
    windows = []
    for _ in range(num_samples):
        while True:
            if len(lengths) == len(documents) and not long_docs:
                raise ValueError(
                    f"no calibration document has more than seqlen={seqlen} tokens (the longest has "
                    f"{max(lengths.values())}); lower prune.calibration.seqlen or calibrate on a longer "
                    "source"
                )
            i = rng.randint(0, len(documents) - 1)
            if i not in lengths:
                ids = encode(documents[i])
                lengths[i] = ids.numel()
                if ids.numel() > seqlen:
                    long_docs[i] = ids
            if i in long_docs:
                break
        ids = long_docs[i]
        start = rng.randint(0, ids.numel() - seqlen - 1)
        windows.append(ids[start : start + seqlen])
    return torch.stack(windows)
