"""Score generations two ways: as LLM-Adapters does, and by a stricter rule reported beside it.

The reference protocol (`extract_prediction`, `score`) is LLM-Adapters' evaluate.py and
commonsense_evaluate.py, quirks included:
- LLM-Adapters decodes prompt + generation and keeps `split("### Response:")[1]`, so anything a
  model writes after a second "### Response:" is ignored; we cut the generation there too.
- numeric: drop commas, take the LAST match of `-?\\d+\\.?\\d*`; correct when within 0.001 of the
  label. No number scores wrong (LLM-Adapters uses inf; we return None). A hyphen counts as a
  minus sign ("3-4 apples" ends in -4).
- aqua: the FIRST capital A–E anywhere, not only an option letter ("Each ..." answers E).
- choice: the FIRST occurrence of any of the task's keywords, case-sensitive ("True" is no
  answer for boolq) and inside longer words ("untrue" answers true); compared exactly to the label.

The strict protocol (`extract_strict`, `score_strict`) reads the same generations without those
quirks, so a gap between the two accuracies shows where the reference rule miscounts.
"""

from __future__ import annotations

import re

from nlsflow.data.datasets import EvalDataset

REFERENCE_PROTOCOL = "llm-adapters"
STRICT_PROTOCOL = "strict"

_NUMBER = re.compile(r"-?\d+\.?\d*")
_OPTION_LETTER = re.compile(r"A|B|C|D|E")
_NUMERIC_TOLERANCE = 0.001

_ANSWER_FORMAT = re.compile(r"Answer format:\s*(\w+(?:/\w+)+)")  # "Answer format: answer1/answer2/answer3"
_NEXT_SECTION = re.compile(r"###\s*(?:Instruction|Input|Response)\s*:")
_ANSWER_IS = re.compile(r"\bthe\s+(?:correct\s+)?answer\s+is\b", re.IGNORECASE)
# An optional sign only where no word or digit precedes it, so "3-4" is 3 and 4; "1,000" is one number.
_STRICT_NUMBER = re.compile(r"(?:(?<![\w.])-)?(?<![\w.])(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")
_STRICT_OPTION = re.compile(
    r"\(([A-E])\)"  # (C)
    r"|(?<![\w.])([A-E])[).](?!\w)"  # C)  C.
    r"|(?i:\b(?:answer\s+is|answer\s*:|option|choice))\s*\(?([A-E])(?!\w)"  # answer is C, Answer: C, option C
)


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


def chance_level(prompt: str) -> float | None:
    """A uniform guess's accuracy on a multiple-choice record: one over the options its "Answer format: a/b/c" line
    names (commonsense); None for an open answer (math)."""
    match = _ANSWER_FORMAT.search(prompt)
    return None if match is None else 1 / len(match.group(1).split("/"))


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


def extract_strict(kind: str, text: str, keywords: tuple[str, ...] = ()) -> str | float | None:
    """The answer a generation gives under the strict rule for `kind`, or None if it gives none.

    - all kinds: the text stops at the first "### Instruction:/Input:/Response:" header (the model
      has started a new example). If it says "the answer is" or "the correct answer is" (any case),
      the FIRST such phrase is where the answer is read: a greedy model commits to an answer and then
      often rambles on into invented follow-up questions with answers of their own, so the last
      phrase is usually not its answer to this question. When nothing after that phrase fits the
      kind, or there is no such phrase, the whole text is read.
    - numeric: a number is digits not glued to a letter, digit or dot on the left ("x2" is none),
      with a minus sign only where no word precedes it ("3-4" is 3 and 4, not -4), comma groups of
      three as thousands ("1,000" is 1000, "3,4" is 3 and 4), and a decimal part only when digits
      follow the dot ("72." is 72). The first number after the phrase, else the last in the text.
    - aqua: a capital A–E only as an option token: "(C)", "C)", "C.", "answer is C", "Answer: C",
      "option C"; never a letter inside a word ("Answer", "Each") nor the article "A". The first.
    - choice: a keyword in any case as a whole word ("True" is true; "untrue" is nothing, nor is
      "answer12" answer1), returned as the dataset spells it. The first.
    """
    response = _NEXT_SECTION.split(text, maxsplit=1)[0]
    anchor = _ANSWER_IS.search(response)
    after = response[anchor.start() :] if anchor else ""
    if kind == "numeric":
        first = _STRICT_NUMBER.search(after)
        numbers = _STRICT_NUMBER.findall(response)
        number = first.group(0) if first else (numbers[-1] if numbers else None)
        return None if number is None else float(number.replace(",", ""))
    if kind == "aqua":
        match = _STRICT_OPTION.search(after) or _STRICT_OPTION.search(response)
        return match.group(match.lastindex) if match else None
    if kind == "choice":
        if not keywords:
            raise ValueError("choice tasks need their answer keywords, e.g. ('true', 'false') for boolq")
        pattern = re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, keywords)) + r")(?!\w)", re.IGNORECASE)
        match = pattern.search(after) or pattern.search(response)
        return next(k for k in keywords if k.lower() == match.group(0).lower()) if match else None
    raise ValueError(f"unknown answer kind {kind!r}; expected 'numeric', 'aqua' or 'choice'")


def score_strict(dataset: EvalDataset, generation: str, label: str) -> tuple[str | None, bool]:
    """(prediction as text or None, correct) for one generation on `dataset`, under the strict rule."""
    prediction = extract_strict(dataset.kind, generation, dataset.keywords)
    correct = is_correct(dataset.kind, prediction, label)
    return (None if prediction is None else str(prediction)), correct
