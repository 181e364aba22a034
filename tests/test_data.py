"""Prompt template, test and training sets, source inference, contamination, splitting, tokenization, calibration."""

import gzip
import json
import random
import shutil

import pytest
import torch
from conftest import DATA_ROOT, needs_data
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from nlsflow.data.datasets import (
    EVAL_DATASETS,
    TASK_EVAL_SETS,
    TRAIN_DEFAULTS,
    ContaminationError,
    calibration_batch,
    calibration_documents,
    check_contamination,
    generate_prompt,
    infer_source,
    load_eval_records,
    load_records,
    load_train_records,
    normalize_question,
    question_key,
    split_validation,
    tokenize_for_training,
    wikitext2,
)
from nlsflow.data.registry import DATA_FILES, MissingDataError

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
    for names in TRAIN_DEFAULTS.values():
        assert all(DATA_FILES[name].role == "train" for name in names)


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
    with pytest.raises(FileNotFoundError, match=r"missing data file .*nope\.json: put it under .* or set data\.root="):
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


# Training records asking a test question, per registered test set (question_key), on the shared data.
MATH_OVERLAPS = {"mawps_test": 27, "AddSub_test": 412, "MultiArith_test": 446, "SingleEq_test": 510}
CHECKED = [name for name, entry in DATA_FILES.items() if entry.role == "test" and name != "hellaswag_full_test"]


@pytest.fixture(scope="module")
def math_records():
    return load_train_records(DATA_ROOT, TRAIN_DEFAULTS["math"])


@needs_data
def test_math_training_sets_in_order_each_with_its_source(math_records):
    assert len(math_records) == 7473 + 1898  # GSM8K train + MAWPS train: loading filters nothing
    assert all(r["output"].endswith(f"The answer is {r['output'].rsplit(' ', 1)[-1]}") for r in math_records)
    assert math_records[7473] == {
        "instruction": "A waiter had 22 customers in his section . If 14 of them left and the rest of his "
        "tables had 4 people at each table , how many tables did he have ?",
        "input": "",
        "output": "((22.0-14.0)/4.0) = 2. The answer is 2.",
        "answer": "2.0",
        "source": "mawps",
    }
    assert {r["source"] for r in math_records[:7473]} == {"gsm8k"}
    assert {r["source"] for r in math_records[7473:]} == {"mawps"}
    assert load_train_records(DATA_ROOT, "math") == math_records  # a task name stands for its defaults


@needs_data
def test_mawps_equations_to_solve_and_fractions_read_well():
    outputs = {r["output"] for r in load_train_records(DATA_ROOT, ["mawps_train"])}
    assert "11.166666666666666-0.8333333333333334 = 10.3333. The answer is 10.3333." in outputs
    assert "Solving X-6=52 gives 58. The answer is 58." in outputs


@needs_data
def test_math_contamination_is_dropped_and_reported(math_records):
    kept, report = check_contamination(math_records, DATA_ROOT, mode="drop")
    # MAWPS train repeats questions of four test sets; GSM8K train none. 1192 distinct records, 706 MAWPS left.
    assert report == {
        "checked": CHECKED,
        "skipped": ["hellaswag_full_test"],
        "overlaps": MATH_OVERLAPS,
        "dropped": 1192,
    }
    assert len(kept) == 7473 + 1898 - 1192
    assert sum(r["source"] == "gsm8k" for r in kept) == 7473
    test_keys = {
        question_key(r["instruction"])
        for name in ("mawps", "AddSub", "MultiArith", "SingleEq")
        for r in load_eval_records(DATA_ROOT, name)
    }
    assert not any(question_key(r["instruction"]) in test_keys for r in kept)

    again, report = check_contamination(kept, DATA_ROOT, mode="refuse")  # clean data passes untouched
    assert again == kept and report["overlaps"] == {} and report["dropped"] == 0


@needs_data
def test_refusal_is_one_line_with_counts_and_the_fix(math_records):
    with pytest.raises(ContaminationError) as err:
        check_contamination(math_records, DATA_ROOT, mode="refuse")
    assert str(err.value) == (
        "1192 training records ask test questions (mawps_test 27, AddSub_test 412, "
        "MultiArith_test 446, SingleEq_test 510): set data.contamination=drop to drop and "
        "report them"
    )
    with pytest.raises(ValueError, match="mode must be"):
        check_contamination(math_records, DATA_ROOT, mode="keep")


@needs_data
def test_question_key_finds_what_whitespace_normalization_misses(math_records):
    mawps = math_records[7473:]
    # (test set, MAWPS train records found by normalize_question, by question_key)
    for name, by_normalized, by_key in (
        ("mawps", 27, 27),
        ("AddSub", 403, 412),
        ("MultiArith", 0, 446),
        ("SingleEq", 0, 510),
        ("SVAMP", 0, 0),
    ):
        test = load_eval_records(DATA_ROOT, name)
        normalized = {normalize_question(r["instruction"]) for r in test}
        keys = {question_key(r["instruction"]) for r in test}
        assert sum(normalize_question(r["instruction"]) in normalized for r in mawps) == by_normalized, name
        assert sum(question_key(r["instruction"]) in keys for r in mawps) == by_key, name
    assert question_key("Benny worked 3 hours for 6 days . How many hours ?") == question_key(
        " benny worked 3 hours for 6 days. How many  hours?"
    )
    assert question_key("a part - time job") == question_key("a part-time job") != question_key("a parttime job")


@needs_data
def test_commonsense_training_sets_and_their_contamination():
    records = load_train_records(DATA_ROOT, TRAIN_DEFAULTS["commonsense"])
    # the seven training splits available offline (HellaSwag's is not), in the task's order
    assert len(records) == 9427 + 16113 + 33410 + 40398 + 2251 + 1119 + 4957
    assert records[0]["output"] == "the correct answer is true" and records[0]["source"] == "boolq"
    kept, report = check_contamination(records, DATA_ROOT, mode="drop")
    # One BoolQ question differs from a test question only in a space before "("; three PIQA goals and two
    # ARC-Easy questions reappear in their test sets.
    assert report["overlaps"] == {"boolq_test": 1, "piqa_test": 3, "ARC-Easy_test": 2} and report["dropped"] == 6
    assert len(kept) == len(records) - 6


def test_contamination_skips_and_lists_missing_test_sets(tmp_path):
    records = [{"instruction": "Q?", "output": "", "answer": "1"}]
    kept, report = check_contamination(records, tmp_path, mode="refuse")
    assert kept == records
    assert report == {
        "checked": [],
        "skipped": [n for n, e in DATA_FILES.items() if e.role == "test"],
        "overlaps": {},
        "dropped": 0,
    }


@needs_data
def test_contamination_checks_the_test_sets_present(tmp_path):
    relpath = DATA_FILES["SingleEq_test"].path
    (tmp_path / relpath).parent.mkdir(parents=True)
    shutil.copy(DATA_ROOT / relpath, tmp_path / relpath)
    question = load_eval_records(tmp_path, "SingleEq", 1)[0]["instruction"]
    records = [
        {"instruction": question.upper().replace(".", " . "), "answer": "1"},
        {"instruction": "Q?", "answer": "2"},
    ]
    kept, report = check_contamination(records, tmp_path, mode="drop")
    assert kept == records[1:]
    assert report["checked"] == ["SingleEq_test"] and report["overlaps"] == {"SingleEq_test": 1}
    assert report["dropped"] == 1 and "mawps_test" in report["skipped"]


def _write_json(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))


def test_source_is_inferred_per_record_for_mixed_sets(tmp_path):
    math = [
        {"instruction": f"m{i}", "input": "", "output": f"... The answer is {a}.", "answer": a}
        for i, a in enumerate(["18", "B", "1,250.5", "-3"])
    ]
    commonsense = [
        {"instruction": f"c{i}", "input": "", "output": f"the correct answer is {a}", "answer": a}
        for i, a in enumerate(["true", "false", "answer3", "solution2", "option1", "ending4", "answer5"])
    ]
    _write_json(tmp_path / DATA_FILES["math_10k"].path, math)
    _write_json(tmp_path / DATA_FILES["commonsense_170k"].path, commonsense)
    records = load_train_records(tmp_path, ["math_10k", "commonsense_170k"], download=False)
    assert [r["source"] for r in records] == [
        "gsm8k",
        "AQuA",
        "gsm8k",
        "gsm8k",
        "boolq",
        "boolq",
        "social_i_qa",
        "piqa",
        "winogrande",
        "hellaswag",
        "social_i_qa",
    ]
    for r in records:  # each label is one its source's scoring reads
        dataset = EVAL_DATASETS[r["source"]]
        assert r["answer"] in dataset.keywords if dataset.kind == "choice" else True
    assert records[0] == {**math[0], "source": "gsm8k"}

    _write_json(
        tmp_path / DATA_FILES["commonsense_15k"].path, [*commonsense[:2], {**commonsense[0], "answer": "maybe"}]
    )
    with pytest.raises(ValueError, match="commonsense_15k record 2: no evaluation set scores the answer 'maybe'"):
        load_train_records(tmp_path, ["commonsense_15k"], download=False)


def test_infer_source_labels():
    assert [infer_source(a) for a in ("72", "-0.5", "1,080", "A", "E", "True", " false ", "answer1", "ending2")] == [
        "gsm8k",
        "gsm8k",
        "gsm8k",
        "AQuA",
        "AQuA",
        "boolq",
        "boolq",
        "social_i_qa",
        "hellaswag",
    ]
    for bad in ("nan", "inf", "F", "AB", "", "answer6"):
        with pytest.raises(ValueError, match="no evaluation set scores"):
            infer_source(bad)


def test_training_set_names_are_checked(tmp_path):
    for name in ("gsm8k_test", "math_data", "wikitext2_valid"):
        with pytest.raises(ValueError, match=f"unknown training set '{name}'; choose from gsm8k_train, mawps_train"):
            load_train_records(tmp_path, [name])
    with pytest.raises(ValueError, match="no training sets named"):
        load_train_records(tmp_path, [])
    with pytest.raises(
        MissingDataError,
        match=r"math_10k\.json \(math_10k\) and downloads are off: fetch "
        r"https://raw\.githubusercontent\.com/AGI-Edgerunners/LLM-Adapters/"
        r"main/ft-training_set/math_10k\.json",
    ):
        load_train_records(tmp_path, ["math_10k"], download=False)


def test_split_validation_is_deterministic_and_disjoint():
    records = [{"i": i} for i in range(100)]
    train, val = split_validation(records, val_size=10, seed=0)
    assert len(train) == 90 and len(val) == 10
    assert sorted(r["i"] for r in train + val) == list(range(100))
    assert split_validation(records, 10, seed=0) == (train, val)
    assert split_validation(records, 10, seed=1)[1] != val
    with pytest.raises(ValueError):
        split_validation(records, 100, seed=0)


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


def test_split_tokenization_trains_on_the_prompt_tokens_evaluation_gives():
    """A BPE that merges " t" before "  " (as byte-level BPEs join a space to the next word) tokenizes the template's
    16 trailing spaces differently when the response follows: jointly (LLM-Adapters) the trained prompt is not the
    evaluated one; split, it is, token for token."""
    chars = sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .+=?#:,\n"))
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *chars, " t", "  "])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[(" ", "t"), (" ", " ")], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<unk>")
    record = {"instruction": "Is 5 odd?", "input": "", "output": "the answer is true"}
    evaluated = tokenizer(generate_prompt(record["instruction"]))["input_ids"]
    split = tokenize_for_training(tokenizer, record, 512, train_on_inputs=False, tokenize="split")
    joint = tokenize_for_training(tokenizer, record, 512, train_on_inputs=False, tokenize="joint")
    assert split["input_ids"][: len(evaluated)] == evaluated
    assert tokenizer.decode(split["input_ids"][len(evaluated) : -1]) == record["output"]
    assert split["labels"][: len(evaluated)] == [-100] * len(evaluated)
    assert split["labels"][len(evaluated) :] == split["input_ids"][len(evaluated) :]
    assert joint["input_ids"][: len(evaluated)] != evaluated
    assert tokenizer.decode(joint["input_ids"][:-1]) == tokenizer.decode(split["input_ids"][:-1])  # the same text


@needs_data
def test_wikitext2_splits():
    valid = wikitext2(DATA_ROOT, "valid")
    assert valid.startswith(" \n = Homarus gammarus = \n")
    assert calibration_documents(DATA_ROOT, "wikitext2") == [valid]
    assert wikitext2(DATA_ROOT, "test") != valid
    with pytest.raises(ValueError):
        wikitext2(DATA_ROOT, "train")


@needs_data
def test_task_calibration_text_is_the_clean_training_prompts():
    [document] = calibration_documents(DATA_ROOT, "task", train_names=["mawps_train"])
    records, _ = check_contamination(load_train_records(DATA_ROOT, ["mawps_train"]), DATA_ROOT, mode="drop")
    assert len(records) == 1898 - 1192
    assert document == "\n\n".join(generate_prompt(r["instruction"], "", r["output"]) for r in records)
    with pytest.raises(ContaminationError):
        calibration_documents(DATA_ROOT, "task", train_names=["mawps_train"], contamination="refuse")
    with pytest.raises(ValueError, match="needs train_names"):
        calibration_documents(DATA_ROOT, "task")


def test_c4_documents_are_the_shard_texts(tmp_path):
    with pytest.raises(MissingDataError, match="huggingface.co/datasets/allenai/c4/resolve/main/en/c4-train.00000"):
        calibration_documents(tmp_path, "c4", download=False)
    path = tmp_path / DATA_FILES["c4_train_shard"].path
    path.parent.mkdir(parents=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for text in ("First document.", "Second one."):
            f.write(json.dumps({"text": text, "timestamp": "2019-04-25T12:57:54Z", "url": "https://x"}) + "\n")
    assert calibration_documents(tmp_path, "c4", download=False) == ["First document.", "Second one."]
    with pytest.raises(ValueError, match="calibration source must be"):
        calibration_documents(tmp_path, "pile")


def test_calibration_batch_from_one_document(char_tokenizer):
    text = "abcdefghijklmnopqrstuvwxyz0123456789" * 10  # 360 tokens
    batch = calibration_batch(char_tokenizer, [text], num_samples=8, seqlen=16, seed=0)
    assert batch.shape == (8, 16) and batch.dtype == torch.long
    ids = char_tokenizer(text, add_special_tokens=False)["input_ids"]
    rng = random.Random(0)  # the windows stages/prune.py drew before: randrange(0, n - seqlen)
    assert batch.tolist() == [ids[s : s + 16] for s in (rng.randrange(0, len(ids) - 16) for _ in range(8))]
    assert torch.equal(calibration_batch(char_tokenizer, text, 8, 16, seed=0), batch)  # a str is one document
    assert not torch.equal(calibration_batch(char_tokenizer, [text], 8, 16, seed=1), batch)
    with pytest.raises(ValueError, match="calibration text has 16 tokens, not more than seqlen=16"):
        calibration_batch(char_tokenizer, [text[:16]], 2, 16, seed=0)


def _wanda_get_c4(tokenizer, documents, nsamples, seed, seqlen):
    """Wanda's lib/data.py get_c4 sampling loop (global `random`), minus BOS."""
    state = random.getstate()
    random.seed(seed)
    windows = []
    for _ in range(nsamples):
        while True:
            i = random.randint(0, len(documents) - 1)
            enc = tokenizer(documents[i], return_tensors="pt", add_special_tokens=False).input_ids
            if enc.shape[1] > seqlen:
                break
        i = random.randint(0, enc.shape[1] - seqlen - 1)
        windows.append(enc[:, i : i + seqlen])
    random.setstate(state)
    return torch.cat(windows)


def test_calibration_batch_samples_documents_as_wanda(char_tokenizer):
    documents = ["1111", "a" * 40, "22222", "b" * 50, "c" * 20, "33", "d" * 60 + "e" * 60]
    for seed in (0, 3):
        batch = calibration_batch(char_tokenizer, documents, num_samples=12, seqlen=20, seed=seed)
        assert batch.shape == (12, 20)
        assert torch.equal(batch, _wanda_get_c4(char_tokenizer, documents, 12, seed, 20))
        assert torch.equal(calibration_batch(char_tokenizer, documents, 12, 20, seed=seed), batch)
        rows = {char_tokenizer.decode(row) for row in batch.tolist()}
        assert all(set(row) <= set("abde") for row in rows)  # only documents longer than seqlen ("c" * 20 is not)
    assert len({char_tokenizer.decode(row)[0] for row in batch.tolist()}) > 1  # several documents drawn
    with pytest.raises(
        ValueError,
        match=r"no calibration document has more than seqlen=20 tokens \(the longest "
        r"has 5\)",
    ):
        calibration_batch(char_tokenizer, ["1111", "22222", "33"], 2, 20, seed=0)
    with pytest.raises(ValueError, match="no calibration documents"):
        calibration_batch(char_tokenizer, [], 2, 20, seed=0)
