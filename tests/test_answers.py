"""The LLM-Adapters scoring rules, on realistic generations and on the rules' known quirks."""
import pytest

from nlsflow.answers import REFERENCE_PROTOCOL, extract_prediction, is_correct, score
from nlsflow.data import EVAL_DATASETS


def test_protocol_name():
    assert REFERENCE_PROTOCOL == "llm-adapters"


@pytest.mark.parametrize(
    "generation, expected",
    [
        ("She sells 16 - 3 - 4 = 9 eggs at $2 each, so 9 * 2 = 18. The answer is 18.", 18.0),
        ("The total is 1,234,567 dollars.", 1234567.0),  # commas are removed before matching
        ("Each costs $0.75, so 4 cost 3.00.", 3.0),
        ("He is left with -5 degrees.", -5.0),
        ("The answer is 7.", 7.0),  # "7." matches with its dot and still parses
        ("I do not know.", None),
        ("", None),
    ],
)
def test_numeric_takes_last_number(generation, expected):
    assert extract_prediction("numeric", generation) == expected


def test_numeric_quirk_hyphen_reads_as_minus_sign():
    assert extract_prediction("numeric", "She reads pages 3-4 today.") == -4.0


def test_numeric_quirk_trailing_units_and_years_win():
    # The last number counts, even when the answer came earlier.
    assert extract_prediction("numeric", "The answer is 42 apples by 2023.") == 2023.0


def test_numeric_quirk_text_after_second_response_header_is_ignored():
    generation = "12 + 30 = 42. The answer is 42.\n\n### Instruction:\nNext one\n\n### Response:\n99"
    assert extract_prediction("numeric", generation) == 42.0


def test_numeric_correct_within_tolerance():
    assert is_correct("numeric", 1.8333, "1.8333333333333335")
    assert is_correct("numeric", 18.0, "18")
    assert not is_correct("numeric", 18.002, "18")
    assert not is_correct("numeric", None, "0")


@pytest.mark.parametrize(
    "generation, expected",
    [
        ("The answer is (C)", "C"),
        ("the correct option is b) 42 ... so (D)", "D"),  # lower-case letters never count
        ("Answer: (C)", "A"),  # quirk: the A of "Answer" comes first
        ("Each train covers 40 km. The answer is B", "E"),  # quirk: the E of "Each"
        ("no capital option letter here", None),
    ],
)
def test_aqua_takes_first_capital_a_to_e(generation, expected):
    assert extract_prediction("aqua", generation) == expected


@pytest.mark.parametrize(
    "name, generation, expected",
    [
        ("boolq", "the correct answer is false", "false"),
        ("boolq", "the correct answer is true, not false", "true"),  # first occurrence wins
        ("boolq", "The correct answer is True", None),  # quirk: matching is case-sensitive
        ("boolq", "that is untrue", "true"),  # quirk: keywords match inside longer words
        ("piqa", "the correct answer is solution2", "solution2"),
        ("ARC-Challenge", "answer4 is wrong, the correct answer is answer2", "answer4"),
        ("ARC-Easy", "the correct answer is Answer3", None),  # prompts say "Answer3", labels say "answer3"
        ("hellaswag", "the correct answer is ending3", "ending3"),
        ("winogrande", "option1", "option1"),
        ("social_i_qa", "the correct answer is answer5", "answer5"),
    ],
)
def test_choice_takes_first_keyword(name, generation, expected):
    assert extract_prediction("choice", generation, EVAL_DATASETS[name].keywords) == expected


def test_choice_needs_keywords():
    with pytest.raises(ValueError, match="keywords"):
        extract_prediction("choice", "true")


def test_unknown_kind_is_an_error():
    with pytest.raises(ValueError, match="unknown answer kind"):
        extract_prediction("regression", "1")


def test_score_per_dataset():
    assert score(EVAL_DATASETS["gsm8k"], "5 + 13 = 18. The answer is 18.", "18.0") == ("18.0", True)
    assert score(EVAL_DATASETS["SVAMP"], "The answer is 17.", "8.0") == ("17.0", False)
    assert score(EVAL_DATASETS["mawps"], "no idea", "3") == (None, False)
    assert score(EVAL_DATASETS["AQuA"], "The answer is (C)", "C") == ("C", True)
    assert score(EVAL_DATASETS["boolq"], "the correct answer is true", "false") == ("true", False)
    assert score(EVAL_DATASETS["piqa"], "The correct answer is Solution1", "solution1") == (None, False)
