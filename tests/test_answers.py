"""Both scoring protocols on realistic generations: the LLM-Adapters rules with their known quirks, and the
strict rules, side by side where they agree and where they disagree."""

import pytest

from nlsflow.data.datasets import EVAL_DATASETS
from nlsflow.evaluation.answers import (
    REFERENCE_PROTOCOL,
    STRICT_PROTOCOL,
    extract_prediction,
    extract_strict,
    is_correct,
    score,
    score_strict,
)


def test_protocol_names():
    assert REFERENCE_PROTOCOL == "llm-adapters"
    assert STRICT_PROTOCOL == "strict"


def test_numeric_quirk_text_after_second_response_header_is_ignored():
    generation = "12 + 30 = 42. The answer is 42.\n\n### Instruction:\nNext one\n\n### Response:\n99"
    assert extract_prediction("numeric", generation) == 42.0


def test_numeric_correct_within_tolerance():
    assert is_correct("numeric", 1.8333, "1.8333333333333335")
    assert is_correct("numeric", 18.0, "18")
    assert not is_correct("numeric", 18.002, "18")
    assert not is_correct("numeric", None, "0")


def test_score_per_dataset():
    assert score(EVAL_DATASETS["gsm8k"], "5 + 13 = 18. The answer is 18.", "18.0") == ("18.0", True)
    assert score(EVAL_DATASETS["SVAMP"], "The answer is 17.", "8.0") == ("17.0", False)
    assert score(EVAL_DATASETS["mawps"], "no idea", "3") == (None, False)
    assert score(EVAL_DATASETS["AQuA"], "The answer is (C)", "C") == ("C", True)
    assert score(EVAL_DATASETS["boolq"], "the correct answer is true", "false") == ("true", False)
    assert score(EVAL_DATASETS["piqa"], "The correct answer is Solution1", "solution1") == (None, False)


# (generation, reference prediction, strict prediction): rows where they differ show a reference quirk.
@pytest.mark.parametrize(
    "generation, reference, strict",
    [
        ("She sells 16 - 3 - 4 = 9 eggs at $2 each, so 9 * 2 = 18. The answer is 18.", 18.0, 18.0),
        ("Painting takes 3-4 hours a room, so 2 + 5 = 7. The answer is 7.", 7.0, 7.0),
        ("The total is 1,234,567 dollars.", 1234567.0, 1234567.0),
        ("Each costs $0.75, so 4 cost 3.00.", 3.0, 3.0),
        ("He is left with -5 degrees.", -5.0, -5.0),
        ("The answer is 72.", 72.0, 72.0),
        ("I do not know.", None, None),
        ("", None, None),
        ("The answer is 18.\n\nNext question: Tom has 5 apples.", 5.0, 18.0),  # first "The answer is" wins
        ("The answer is 18.\n\nQuestion: 2 + 3?\nThe answer is 5.", 5.0, 18.0),  # not the last one
        ("The answer is 42 apples by 2023.", 2023.0, 42.0),
        ("She reads pages 3-4 today.", -4.0, 4.0),  # a hyphen between digits is no minus sign
        ("So 5 * 4 = 20 boxes fill truck T2", 2.0, 20.0),  # "T2" is a name, not a number
        ("She needs boxes 3,4", 34.0, 4.0),  # a list, not thousands
        ("5 + 2 = 7\n\n### Instruction:\nAdd 3 and 4", 4.0, 7.0),  # the model started a new example
    ],
)
def test_numeric_protocols(generation, reference, strict):
    assert extract_prediction("numeric", generation) == reference
    assert extract_strict("numeric", generation) == strict


@pytest.mark.parametrize(
    "generation, reference, strict",
    [
        ("The answer is (C)", "C", "C"),
        ("the correct option is b) 42 ... so (D)", "D", "D"),  # lower-case letters never count
        ("no capital option letter here", None, None),
        ("Answer: (C)", "A", "C"),
        ("Answer: C", "A", "C"),
        ("Each train covers 40 km. The answer is B", "E", "B"),
        ("Between 10 and 20 km, so the answer is D.", "B", "D"),
        ("Option E is too large; the answer is C", "E", "C"),
        ("The answer is B.\n\nQuestion: which is larger? The answer is D", "B", "B"),
        ("A train at 60 km/h covers 120 km in 2 hours.", "A", None),  # the article is no option
        ("Speed is 120 / 2 = 60 km/h, option E", "E", "E"),
    ],
)
def test_aqua_protocols(generation, reference, strict):
    assert extract_prediction("aqua", generation) == reference
    assert extract_strict("aqua", generation) == strict


@pytest.mark.parametrize(
    "name, generation, reference, strict",
    [
        ("boolq", "the correct answer is false", "false", "false"),
        ("boolq", "the correct answer is true, not false", "true", "true"),
        ("piqa", "the correct answer is solution2", "solution2", "solution2"),
        ("winogrande", "option1", "option1", "option1"),
        ("boolq", "The correct answer is True", None, "true"),
        ("boolq", "that is untrue", "true", None),
        ("boolq", "false alarms happen, but the correct answer is true", "false", "true"),
        ("ARC-Easy", "the correct answer is Answer3", None, "answer3"),
        ("ARC-Challenge", "answer4 is wrong, the correct answer is answer2", "answer4", "answer2"),
        ("social_i_qa", "the correct answer is answer12", "answer1", None),
        ("hellaswag", "the correct answer is ending3", "ending3", "ending3"),
        ("social_i_qa", "the correct answer is answer5", "answer5", "answer5"),
        ("hellaswag", "Ending2", None, "ending2"),
    ],
)
def test_choice_protocols(name, generation, reference, strict):
    keywords = EVAL_DATASETS[name].keywords
    assert extract_prediction("choice", generation, keywords) == reference
    assert extract_strict("choice", generation, keywords) == strict


@pytest.mark.parametrize("extract", [extract_prediction, extract_strict])
def test_choice_needs_keywords_and_kinds_are_known(extract):
    with pytest.raises(ValueError, match="keywords"):
        extract("choice", "true")
    with pytest.raises(ValueError, match="unknown answer kind"):
        extract("regression", "1")


def test_score_strict_per_dataset():
    assert score_strict(EVAL_DATASETS["gsm8k"], "The answer is 18.\nQ: 5 apples?", "18") == ("18.0", True)
    assert score(EVAL_DATASETS["gsm8k"], "The answer is 18.\nQ: 5 apples?", "18") == ("5.0", False)
    assert score_strict(EVAL_DATASETS["SVAMP"], "The answer is 1,000.", "1000.0") == ("1000.0", True)
    assert score_strict(EVAL_DATASETS["mawps"], "no idea", "3") == (None, False)
    assert score_strict(EVAL_DATASETS["AQuA"], "Answer: (C)", "C") == ("C", True)
    assert score_strict(EVAL_DATASETS["piqa"], "The correct answer is Solution1", "solution1") == ("solution1", True)
    assert score_strict(EVAL_DATASETS["boolq"], "the correct answer is true", "false") == ("true", False)
