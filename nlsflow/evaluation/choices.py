"""A commonsense record's options, read back from LLM-Adapters' instruction text.

LLM-Adapters' commonsense files keep no structured fields: the question and its options are written into the
instruction ("...question: Q\\n\\nAnswer1: A Answer2: B\\n\\nAnswer format: answer1/answer2"). Log-likelihood scoring
(lm-eval's multiple choice) needs them apart: the question as the context, each option's own text as a continuation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

RESPONSE = "the correct answer is {}"  # every commonsense record's output, its label filled in
# the sets whose lm-eval headline is acc_norm (likelihood per character); BoolQ, Social IQa and WinoGrande report acc
CLOZE_NORMALIZED = frozenset({"piqa", "ARC-Easy", "ARC-Challenge", "openbookqa", "hellaswag"})

_LEAD_IN = re.compile(r"^Please (?:choose|answer)[^:]*:\s*")  # "Please choose the correct answer to the question: "
_FORMAT = re.compile(r"\s*Answer format:\s*(\w+(?:/\w+)+)\s*$")
_OPTION = re.compile(r"(?:Answer|Solution|Option|Ending)(\d+):\s*")


@dataclass(frozen=True)
class Choices:
    stem: str  # the question, or the sentence to complete, without the instruction's lead-in
    labels: tuple[str, ...]  # as the "Answer format" line names them: answer1, solution1, option1, ending1, true
    texts: tuple[str, ...]  # each label's own text, in the same order; a true/false question's are its labels


def parse_choices(instruction: str) -> Choices | None:
    """The options of a commonsense record, or None for a record without an "Answer format" line (math).

    Raises ValueError when the options written out do not match the labels the format line names."""
    found = _FORMAT.search(instruction)
    if found is None:
        return None
    labels = tuple(found.group(1).split("/"))
    body = _LEAD_IN.sub("", instruction[: found.start()]).strip()
    stem, *numbered = _OPTION.split(body)
    if not numbered:  # BoolQ: "...with true or false, question: Q"
        return Choices(stem.strip(), labels, labels)
    numbers, texts = numbered[0::2], tuple(text.strip() for text in numbered[1::2])
    if [int(n) for n in numbers] != list(range(1, len(labels) + 1)):
        raise ValueError(f"options {numbers} do not match the answer format {'/'.join(labels)}: {instruction[:80]!r}")
    return Choices(stem.strip(), labels, texts)


def cloze(choices: Choices, source: str) -> list[tuple[str, str]]:
    """(context, continuation) per option, as lm-eval's zero-shot multiple-choice tasks write them: the question
    without its options, then each option's own text. WinoGrande is scored by partial evaluation (the sentence up
    to the blank, the option filled in, is the context; the rest of the sentence is the continuation). BoolQ's
    records in LLM-Adapters' files have no passage, so its context is the question alone, answered " yes" or " no"."""
    if source == "winogrande":
        before, after = choices.stem.split("_", 1)
        return [(before + text, " " + after.strip()) for text in choices.texts]
    if source == "boolq":
        return [(f"Question: {choices.stem}\nAnswer:", " yes" if text == "true" else " no") for text in choices.texts]
    if source == "social_i_qa":
        return [(f"Q: {choices.stem}\nA:", " " + text) for text in choices.texts]
    if source in ("hellaswag", "openbookqa"):
        return [(choices.stem, " " + text) for text in choices.texts]
    return [(f"Question: {choices.stem}\nAnswer:", " " + text) for text in choices.texts]  # PIQA, ARC
