import pytest
import torch
from conftest import DATA_ROOT, micro_llama, needs_data

from nlsflow.data.datasets import generate_prompt
from nlsflow.evaluation.choices import RESPONSE
from nlsflow.evaluation.likelihood import continuation_logprobs, rank_labels

RECORDS = [
    {
        "instruction": "Please choose the correct answer to the question: Which is a mammal?\n\n"
        "Answer1: a trout Answer2: a bat Answer3: a frog\n\nAnswer format: answer1/answer2/answer3",
        "answer": "answer2",
    },
    {
        "instruction": "Please answer the following question with true or false, question: is ice cold?\n\n"
        "Answer format: true/false",
        "answer": "true",
    },
]


def one_by_one(model, context: list[int], continuation: list[int]) -> float:
    logprobs = model(input_ids=torch.tensor([context + continuation])).logits[0].log_softmax(-1)
    return sum(logprobs[len(context) - 1 + k, token].item() for k, token in enumerate(continuation))


@torch.no_grad()
def test_batched_scores_are_each_pair_scored_alone():
    model = micro_llama()
    pairs = [([1, 5, 9, 12], [20, 21]), ([1, 7], [30, 31, 32, 33, 34]), ([1, 40, 41, 42, 43, 44, 45], [50])]
    expected = [one_by_one(model, *pair) for pair in pairs]
    for batch_size in (1, 2, 3):
        assert continuation_logprobs(model, pairs, batch_size=batch_size, pad_id=3) == pytest.approx(expected, abs=1e-4)


@torch.no_grad()
def test_the_ranked_label_is_the_likeliest_response_after_the_prompt(char_tokenizer):
    model = micro_llama()
    rows = rank_labels(model, char_tokenizer, RECORDS, batch_size=2)
    for record, row in zip(RECORDS, rows):
        labels = record["instruction"].rsplit("Answer format: ", 1)[1].split("/")
        prompt = char_tokenizer(generate_prompt(record["instruction"]))["input_ids"]
        scores = [
            one_by_one(model, prompt, char_tokenizer(RESPONSE.format(label), add_special_tokens=False)["input_ids"])
            for label in labels
        ]
        assert row["prediction"] == labels[scores.index(max(scores))]
        assert row["correct"] == (row["prediction"] == record["answer"])
    assert [row["index"] for row in rows] == [0, 1]


def test_an_open_answer_cannot_be_ranked(char_tokenizer):
    with pytest.raises(ValueError, match="not a multiple-choice record"):
        rank_labels(micro_llama(), char_tokenizer, [{"instruction": "Add 2 and 3.", "answer": "5"}])


def test_cloze_pairs_split_where_the_context_ends_and_move_its_trailing_spaces(char_tokenizer):
    from nlsflow.evaluation.likelihood import _cloze_ids

    context, continuation = _cloze_ids(char_tokenizer, "Q: a cat ", "sat")
    assert char_tokenizer.decode(context, skip_special_tokens=True) == "Q: a cat"
    assert char_tokenizer.decode(continuation) == " sat"


@torch.no_grad()
def test_an_option_is_ranked_by_its_likelihood_and_by_its_likelihood_per_character(char_tokenizer):
    from nlsflow.evaluation.choices import cloze, parse_choices
    from nlsflow.evaluation.likelihood import _cloze_ids, rank_options

    model = micro_llama()
    record = RECORDS[0]
    (row,) = rank_options(model, char_tokenizer, [record], "ARC-Easy")
    options = cloze(parse_choices(record["instruction"]), "ARC-Easy")
    scores = [one_by_one(model, *_cloze_ids(char_tokenizer, *option)) for option in options]
    labels = ["answer1", "answer2", "answer3"]
    assert row["prediction"] == labels[scores.index(max(scores))]
    per_char = [score / len(text.lstrip()) for score, (_, text) in zip(scores, options)]
    assert row["prediction_norm"] == labels[per_char.index(max(per_char))]
    assert (row["correct"], row["correct_norm"]) == (
        row["prediction"] == "answer2",
        row["prediction_norm"] == "answer2",
    )


@needs_data
@torch.no_grad()
def test_a_multiple_choice_test_set_is_scored_by_the_cloze_beside_the_generated_answers(char_tokenizer):
    """evaluate and extract score each multiple-choice record both ways in one pass: the generated answer and
    lm-eval's cloze, each with its own accuracy and interval; an open-answer set has no cloze."""
    from nlsflow.data.datasets import load_eval_records
    from nlsflow.evaluation.choices import CLOZE_NORMALIZED
    from nlsflow.evaluation.likelihood import rank_options
    from nlsflow.evaluation.scoring import evaluate_test_sets
    from schemas.config import EvaluateConfig

    model = micro_llama()
    sets = ["boolq", "piqa"]
    generation = {"max_new_tokens": 2, "num_beams": 1, "batch_size": 4}
    ec = EvaluateConfig(datasets=sets, max_samples=6, generation=generation)
    rows, scores = evaluate_test_sets(model, char_tokenizer, DATA_ROOT, ec, "model")
    for name in sets:
        expected = rank_options(model, char_tokenizer, load_eval_records(DATA_ROOT, name, 6), name, batch_size=3)
        mine = [r for r in rows if r["task"] == name]
        assert [r["cloze_correct"] for r in mine] == [e["cloze_correct"] for e in expected]
        assert [e["cloze_correct"] for e in expected] == [
            e["correct_norm" if name in CLOZE_NORMALIZED else "correct"] for e in expected
        ]
        assert scores["accuracy_cloze"][name] == sum(r["cloze_correct"] for r in mine) / 6
        low, high = scores["accuracy_cloze_interval"][name]
        assert low <= scores["accuracy_cloze"][name] <= high
    assert scores["average_accuracy_cloze"] == pytest.approx(sum(scores["accuracy_cloze"].values()) / 2)
    _, math_scores = evaluate_test_sets(
        model, char_tokenizer, DATA_ROOT, EvaluateConfig(datasets=["gsm8k"], max_samples=2, generation=generation), "m"
    )
    assert "accuracy_cloze" not in math_scores


@needs_data
def test_the_search_counts_the_cloze_when_its_objective_says_so(char_tokenizer, monkeypatch):
    """search.objective=cloze: a subnet's validation answers are lm-eval's cloze, not generated; generated (the
    default) generates only."""
    import nlsflow.evaluation.workers as workers
    from nlsflow.data.datasets import load_eval_records
    from nlsflow.evaluation.likelihood import rank_options
    from nlsflow.evaluation.scoring import Shard, predict
    from schemas.config import GenerationConfig

    monkeypatch.setattr(workers, "activate", lambda *a: None)  # no elastic layers in the micro model
    model, records = micro_llama(), load_eval_records(DATA_ROOT, "piqa", 5)
    shard = Shard("supernet", "piqa", False, list(range(5)), records)
    generation = GenerationConfig(max_new_tokens=2, num_beams=1, batch_size=4)
    by = {
        o: workers.SubnetScorer(lambda: (model, char_tokenizer, None), generation, o)() for o in ("generated", "cloze")
    }
    expected = rank_options(model, char_tokenizer, records, "piqa")
    assert by["cloze"](({}, shard)) == sum(r["cloze_correct"] for r in expected)
    generated = predict(model, char_tokenizer, shard, generation, cloze=False)
    assert by["generated"](({}, shard)) == sum(r["correct"] for r in generated)
    assert "cloze_correct" not in generated[0]
