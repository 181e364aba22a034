"""Prompt template, dataset registries, loading, de-contamination, splitting and tokenization."""
import json

import pytest
from tokenizers import Tokenizer, decoders, models, processors
from transformers import PreTrainedTokenizerFast

from nlsflow.data import (
    EVAL_DATASETS,
    TASK_EVAL_SETS,
    TRAIN_SETS,
    calibration_text,
    generate_prompt,
    load_eval_records,
    load_records,
    load_train_records,
    normalize_question,
    split_validation,
    tokenize_for_training,
    wikitext2,
)

from conftest import DATA_ROOT, needs_data

INDENT = " " * 16


def test_prompt_without_input_matches_llm_adapters_finetune_template():
    expected = (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.  \n"
        "\n"
        f"{INDENT}### Instruction:\n"
        f"{INDENT}Add 2 and 3.\n"
        f"{INDENT}\n"
        f"{INDENT}### Response:\n"
        f"{INDENT}The answer is 5."
    )
    assert generate_prompt("Add 2 and 3.", output="The answer is 5.") == expected


def test_prompt_with_input_matches_llm_adapters_finetune_template():
    expected = (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request. \n"
        "\n"
        f"{INDENT}### Instruction:\n"
        f"{INDENT}Add the numbers.\n"
        f"{INDENT}\n"
        f"{INDENT}### Input:\n"
        f"{INDENT}2 and 3\n"
        f"{INDENT}\n"
        f"{INDENT}### Response:\n"
        f"{INDENT}"
    )
    assert generate_prompt("Add the numbers.", "2 and 3") == expected


def test_eval_prompt_is_training_prompt_without_output():
    train_prompt = generate_prompt("Q?", "", "Because. The answer is 1.")
    eval_prompt = generate_prompt("Q?")
    assert eval_prompt.endswith("### Response:\n" + INDENT)
    assert train_prompt == eval_prompt + "Because. The answer is 1."


def test_registries_are_consistent():
    assert TASK_EVAL_SETS["math"] == ("gsm8k", "AQuA", "mawps", "SVAMP")
    assert len(TASK_EVAL_SETS["commonsense"]) == 8
    for names in TASK_EVAL_SETS.values():
        assert set(names) <= set(EVAL_DATASETS)
    for dataset in EVAL_DATASETS.values():
        assert dataset.kind in ("numeric", "aqua", "choice")
        assert (dataset.kind == "choice") == bool(dataset.keywords)
    assert EVAL_DATASETS["AQuA"].kind == "aqua"
    assert EVAL_DATASETS["boolq"].keywords == ("true", "false")
    assert EVAL_DATASETS["openbookqa"].keywords == ("answer1", "answer2", "answer3", "answer4", "answer5")
    assert not any("math_data" in path for paths in TRAIN_SETS.values() for path in paths.values())


@needs_data
@pytest.mark.parametrize("name", sorted(EVAL_DATASETS))
def test_eval_labels_fit_their_scoring_kind(name):
    dataset = EVAL_DATASETS[name]
    records = load_eval_records(DATA_ROOT, name)
    assert len(records) >= 36
    labels = {str(r["answer"]) for r in records}
    if dataset.kind == "numeric":
        [float(label) for label in labels]
    elif dataset.kind == "aqua":
        assert labels <= set("ABCDE")
    else:
        assert len(labels) >= 2 and labels <= set(dataset.keywords)


@needs_data
def test_load_eval_records_keeps_file_order():
    head = load_eval_records(DATA_ROOT, "gsm8k", max_samples=3)
    assert [r["answer"] for r in head] == ["576.0", "120.0", "63.0"]
    assert len(load_eval_records(DATA_ROOT, "gsm8k")) == 1319
    with pytest.raises(ValueError, match="unknown eval dataset"):
        load_eval_records(DATA_ROOT, "gsm8k-hard")


def test_missing_file_names_the_file_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing data file .*nope\.json: put it under .* or set data_root="):
        load_records(tmp_path, "nope.json")


def test_load_records_reads_jsonl_and_rejects_bad_json(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"question": "q1", "answer": "1"}\n\n{"question": "q2", "answer": "2"}\n')
    assert [r["answer"] for r in load_records(tmp_path, "a.jsonl")] == ["1", "2"]
    (tmp_path / "b.json").write_text("[{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_records(tmp_path, "b.json")
    (tmp_path / "c.json").write_text(json.dumps({"data": []}))
    with pytest.raises(ValueError, match="expected a list"):
        load_records(tmp_path, "c.json")


@needs_data
def test_math_training_set_is_gsm8k_plus_decontaminated_mawps():
    records = load_train_records(DATA_ROOT, "math")
    # 7473 GSM8K + 1898 MAWPS train, minus the 27 MAWPS train records whose question is in MAWPS test.
    # (The data README says 26; lowercasing + collapsing whitespace finds 27, exact text 25.)
    assert len(records) == 7473 + 1898 - 27
    mawps_test = {normalize_question(r["instruction"]) for r in load_eval_records(DATA_ROOT, "mawps")}
    assert not any(normalize_question(r["instruction"]) in mawps_test for r in records)
    assert all(r["output"].endswith(f"The answer is {r['output'].rsplit(' ', 1)[-1]}") for r in records)

    first_mawps = records[7473]
    assert first_mawps == {
        "instruction": "A waiter had 22 customers in his section . If 14 of them left and the rest of his "
        "tables had 4 people at each table , how many tables did he have ?",
        "input": "",
        "output": "((22.0-14.0)/4.0) = 2. The answer is 2.",
        "answer": "2.0",
        "source": "mawps",
    }
    assert {r["source"] for r in records[:7473]} == {"gsm8k"}


@needs_data
def test_mawps_equations_to_solve_and_fractions_read_well():
    outputs = {r["output"] for r in load_train_records(DATA_ROOT, "math")[7473:]}
    assert "11.166666666666666-0.8333333333333334 = 10.3333. The answer is 10.3333." in outputs
    assert "Solving X-6=52 gives 58. The answer is 58." in outputs


@needs_data
def test_commonsense_training_set():
    records = load_train_records(DATA_ROOT, "commonsense")
    # boolq + ARC-Easy + ARC-Challenge + openbookqa train, minus 2 ARC-Easy questions also in ARC-Easy test.
    assert len(records) == 9427 + 2251 + 1119 + 4957 - 2
    assert records[0]["output"] == "the correct answer is true"


def test_split_validation_is_deterministic_and_disjoint():
    records = [{"i": i} for i in range(100)]
    train, val = split_validation(records, val_size=10, seed=0)
    assert len(train) == 90 and len(val) == 10
    assert sorted(r["i"] for r in train + val) == list(range(100))
    assert split_validation(records, 10, seed=0) == (train, val)
    assert split_validation(records, 10, seed=1)[1] != val
    with pytest.raises(ValueError):
        split_validation(records, 100, seed=0)


@pytest.fixture(scope="module")
def char_tokenizer():
    """One token per character, BOS prepended, so prompt lengths are exact."""
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .+=?#:,\n"
    chars = sorted(set(alphabet))
    vocab = {token: i for i, token in enumerate(["<unk>", "<s>", "</s>", "<pad>", *chars])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


RECORD = {"instruction": "Add 2 and 3.", "input": "", "output": "2 + 3 = 5. The answer is 5."}


def test_tokenize_masks_prompt_and_appends_eos(char_tokenizer):
    prompt_len = 1 + len(generate_prompt(RECORD["instruction"]))  # BOS + one token per character
    out = tokenize_for_training(char_tokenizer, RECORD, cutoff_len=512, train_on_inputs=False)
    assert len(out["input_ids"]) == prompt_len + len(RECORD["output"]) + 1
    assert out["input_ids"][0] == char_tokenizer.bos_token_id
    assert out["input_ids"][-1] == char_tokenizer.eos_token_id
    assert out["attention_mask"] == [1] * len(out["input_ids"])
    assert out["labels"][:prompt_len] == [-100] * prompt_len
    assert out["labels"][prompt_len:] == out["input_ids"][prompt_len:]
    assert char_tokenizer.decode(out["labels"][prompt_len:-1]) == RECORD["output"]


def test_tokenize_train_on_inputs_keeps_every_label(char_tokenizer):
    out = tokenize_for_training(char_tokenizer, RECORD, cutoff_len=512, train_on_inputs=True)
    assert out["labels"] == out["input_ids"]


def test_tokenize_truncates_without_eos(char_tokenizer):
    prompt_len = 1 + len(generate_prompt(RECORD["instruction"]))
    out = tokenize_for_training(char_tokenizer, RECORD, cutoff_len=prompt_len + 5, train_on_inputs=False)
    assert len(out["input_ids"]) == prompt_len + 5
    assert char_tokenizer.eos_token_id not in out["input_ids"]
    assert out["labels"][:prompt_len] == [-100] * prompt_len
    assert char_tokenizer.decode(out["labels"][prompt_len:]) == "2 + 3"
    # A cutoff inside the prompt leaves nothing to learn from, as in LLM-Adapters.
    short = tokenize_for_training(char_tokenizer, RECORD, cutoff_len=20, train_on_inputs=False)
    assert short["labels"] == [-100] * 20


@needs_data
def test_wikitext2_splits():
    valid = wikitext2(DATA_ROOT, "valid")
    assert valid.startswith(" \n = Homarus gammarus = \n")
    assert calibration_text(DATA_ROOT) == valid
    assert wikitext2(DATA_ROOT, "test") != valid
    with pytest.raises(ValueError):
        wikitext2(DATA_ROOT, "train")
