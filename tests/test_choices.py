import pytest
from conftest import DATA_ROOT, needs_data

from nlsflow.data.datasets import EVAL_DATASETS
from nlsflow.data.registry import DATA_FILES, read_records
from nlsflow.evaluation.choices import RESPONSE, Choices, parse_choices

COMMONSENSE = [name for name, d in EVAL_DATASETS.items() if d.kind == "choice"]


def test_options_come_apart_from_the_question_in_each_template():
    arc = (
        "Please choose the correct answer to the question: Which is a mammal?\n\n"
        "Answer1: a trout Answer2: a bat Answer3: a frog\n\nAnswer format: answer1/answer2/answer3"
    )
    assert parse_choices(arc) == Choices(
        "Which is a mammal?", ("answer1", "answer2", "answer3"), ("a trout", "a bat", "a frog")
    )
    piqa = (
        "Please choose the correct solution to the question: To dry a wet phone,\n\n"
        "Solution1: put it in rice.\n\nSolution2: put it in soup.\n\nAnswer format: solution1/solution2"
    )
    assert parse_choices(piqa).texts == ("put it in rice.", "put it in soup.")
    wino = (
        "Please choose the correct answer to fill in the blank to complete the given sentence: "
        "Ann lent Bo a pen because _ had two.\n\nOption1: Ann Option2: Bo Answer format: option1/option2"
    )
    assert parse_choices(wino) == Choices("Ann lent Bo a pen because _ had two.", ("option1", "option2"), ("Ann", "Bo"))
    boolq = "Please answer the following question with true or false, question: is it?\n\nAnswer format: true/false"
    assert parse_choices(boolq) == Choices("is it?", ("true", "false"), ("true", "false"))
    assert parse_choices("Natalia sold 48 clips. How many?") is None  # math: no options


def test_options_that_do_not_match_the_answer_format_are_an_error():
    with pytest.raises(ValueError, match="do not match the answer format answer1/answer2/answer3"):
        parse_choices("Please choose: Q\n\nAnswer1: a Answer2: b\n\nAnswer format: answer1/answer2/answer3")


@needs_data
@pytest.mark.parametrize("name", [*(f"{n}_test" for n in COMMONSENSE), *(f"{n}_train" for n in COMMONSENSE)])
def test_every_local_commonsense_record_parses_to_its_labels(name):
    if name not in DATA_FILES or not (DATA_ROOT / DATA_FILES[name].path).is_file():
        pytest.skip(f"{name}: not in the shared data")
    for record in read_records(DATA_ROOT / DATA_FILES[name].path):
        choices = parse_choices(record["instruction"])
        assert record["answer"] in choices.labels and len(choices.texts) == len(choices.labels)
        assert record["output"] == RESPONSE.format(record["answer"])
        assert choices.stem and all(choices.texts), record["instruction"][:120]
        if name.startswith("winogrande"):  # one blank, for lm-eval's partial scoring
            assert choices.stem.count("_") == 1


def test_cloze_writes_each_option_after_the_question_as_lm_eval_does():
    from nlsflow.evaluation.choices import cloze

    arc = Choices("Which is a mammal?", ("answer1", "answer2"), ("a trout", "a bat"))
    assert cloze(arc, "ARC-Easy") == [
        ("Question: Which is a mammal?\nAnswer:", " a trout"),
        ("Question: Which is a mammal?\nAnswer:", " a bat"),
    ]
    wino = Choices("Ann lent Bo a pen because _ had two.", ("option1", "option2"), ("Ann", "Bo"))
    assert cloze(wino, "winogrande") == [
        ("Ann lent Bo a pen because Ann", " had two."),
        ("Ann lent Bo a pen because Bo", " had two."),
    ]
    boolq = Choices("is it?", ("true", "false"), ("true", "false"))
    assert [continuation for _, continuation in cloze(boolq, "boolq")] == [" yes", " no"]
    siqa = Choices("Kai sat down. Why?", ("answer1", "answer2"), ("to rest", "to run"))
    assert cloze(siqa, "social_i_qa")[1] == ("Q: Kai sat down. Why?\nA:", " to run")
