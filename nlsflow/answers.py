"""Score generations the way LLM-Adapters does (evaluate.py, commonsense_evaluate.py).

The reference rules, quirks included:
- LLM-Adapters decodes prompt + generation and keeps `split("### Response:")[1]`, so anything a
  model writes after a second "### Response:" is ignored; we cut the generation there too.
- numeric: drop commas, take the LAST match of `-?\\d+\\.?\\d*`; correct when within 0.001 of the
  label. No number scores wrong (LLM-Adapters uses inf; we return None). A hyphen counts as a
  minus sign ("3-4 apples" ends in -4).
- aqua: the FIRST capital A–E anywhere, not only an option letter ("Each ..." answers E).
- choice: the FIRST occurrence of any of the task's keywords, case-sensitive ("True" is no
  answer for boolq) and inside longer words ("untrue" answers true); compared exactly to the label.
"""
from __future__ import annotations

import re

from nlsflow.data import EvalDataset

REFERENCE_PROTOCOL = "llm-adapters"

_NUMBER = re.compile(r"-?\d+\.?\d*")
_OPTION_LETTER = re.compile(r"A|B|C|D|E")
_NUMERIC_TOLERANCE = 0.001


def extract_prediction(kind: str, text: str, keywords: tuple[str, ...] = ()) -> str | float | None:
    """The answer a generation gives under the reference rule for `kind`, or None if it gives none."""
    response = text.split("### Response:")[0].strip()
    if kind == "numeric":
        numbers = _NUMBER.findall(response.replace(",", ""))
        return float(numbers[-1]) if numbers else None
    if kind == "aqua":
        match = _OPTION_LETTER.search(response)
        return match.group(0) if match else None
    if kind == "choice":
        if not keywords:
            raise ValueError("choice tasks need their answer keywords, e.g. ('true', 'false') for boolq")
        match = re.search("|".join(map(re.escape, keywords)), response)
        return match.group(0) if match else None
    raise ValueError(f"unknown answer kind {kind!r}; expected 'numeric', 'aqua' or 'choice'")


def is_correct(kind: str, prediction: str | float | None, label: str) -> bool:
    if prediction is None:
        return False
    if kind == "numeric":
        return abs(float(prediction) - float(label)) <= _NUMERIC_TOLERANCE
    return prediction == label


def score(dataset: EvalDataset, generation: str, label: str) -> tuple[str | None, bool]:
    """(prediction as text or None, correct) for one generation on `dataset`."""
    prediction = extract_prediction(dataset.kind, generation, dataset.keywords)
    correct = is_correct(dataset.kind, prediction, label)
    return (None if prediction is None else str(prediction)), correct
