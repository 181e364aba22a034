"""Batched left-padded generation on a tiny random Llama equals one-prompt-at-a-time generation."""

import copy

import pytest
import torch
from conftest import DATA_ROOT, needs_data
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from nlsflow.data.datasets import EVAL_DATASETS, generate_prompt, load_eval_records
from nlsflow.evaluation.answers import score, score_strict
from nlsflow.evaluation.generation import evaluate_dataset, generate

pytestmark = needs_data

PROMPTS = [
    "The lobster",
    generate_prompt("How many eggs are left if 3 of 16 are eaten?"),
    "It is closely related to the American lobster , H. americanus . It may grow to a length of 60 cm",
    "In life ,",
    generate_prompt("Please answer the following question with true or false, question: is the sea blue?"),
]


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE trained on a few hundred lines of WikiText-2, with Llama's special tokens."""
    lines = (DATA_ROOT / "wikitext-2" / "valid.txt").read_text(encoding="utf-8").splitlines()[:400]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(lines, trainer)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).float().eval()


def one_by_one(model, tokenizer, prompts, max_new_tokens):
    """Reference: each prompt alone, no padding, new tokens cut off by position."""
    texts = []
    for prompt in prompts:
        input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            output = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        texts.append(tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True))
    return texts


def test_batched_generation_equals_one_by_one(model, tokenizer):
    expected = one_by_one(model, tokenizer, PROMPTS, max_new_tokens=8)
    assert len(set(expected)) == len(PROMPTS)  # distinct outputs, so a mix-up of order would show
    tokenizer.padding_side = "right"
    got = generate(model, tokenizer, PROMPTS, max_new_tokens=8, batch_size=3, progress=False)
    assert got == expected
    assert tokenizer.padding_side == "right"  # restored after the call
    assert not any(prompt.strip() and prompt.strip()[:10] in text for prompt, text in zip(PROMPTS, got))


def test_batch_size_does_not_change_results(model, tokenizer):
    whole = generate(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=len(PROMPTS), progress=False)
    single = generate(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=1, progress=False)
    assert whole == single
    assert generate(model, tokenizer, [], max_new_tokens=6) == []


def test_tokenizer_without_pad_token_pads_with_eos_for_the_call(model, tokenizer):
    expected = generate(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=3, progress=False)
    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    assert generate(model, no_pad, PROMPTS, max_new_tokens=6, batch_size=3, progress=False) == expected
    assert no_pad.pad_token is None


def test_beam_search_runs_batched(model, tokenizer):
    beams = generate(model, tokenizer, PROMPTS[:2], max_new_tokens=5, num_beams=3, batch_size=2, progress=False)
    assert len(beams) == 2 and all(isinstance(text, str) for text in beams)


def test_peft_model_generates_batched_like_one_by_one(model, tokenizer):
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(LlamaForCausalLM(model.config), config).eval()
    peft_model.base_model.model.load_state_dict(model.state_dict(), strict=False)
    expected = one_by_one(peft_model, tokenizer, PROMPTS, max_new_tokens=8)
    assert expected != one_by_one(model, tokenizer, PROMPTS, max_new_tokens=8)  # the adapter matters
    assert generate(peft_model, tokenizer, PROMPTS, max_new_tokens=8, batch_size=2, progress=False) == expected
    assert not peft_model.training


def test_evaluate_dataset_rows(model, tokenizer):
    dataset = EVAL_DATASETS["boolq"]
    records = load_eval_records(DATA_ROOT, "boolq", max_samples=4)
    rows = evaluate_dataset(
        model, tokenizer, dataset, records, max_new_tokens=4, num_beams=1, batch_size=3, progress=False
    )
    assert [row["index"] for row in rows] == [0, 1, 2, 3]
    for row, record in zip(rows, records):
        assert set(row) == {
            "task",
            "index",
            "prompt",
            "generation",
            "prediction",
            "label",
            "correct",
            "strict_prediction",
            "strict_correct",
        }
        assert row["task"] == "boolq"
        assert row["prompt"] == generate_prompt(record["instruction"])
        assert row["label"] == record["answer"]
        assert (row["prediction"], row["correct"]) == score(dataset, row["generation"], row["label"])
        assert (row["strict_prediction"], row["strict_correct"]) == score_strict(
            dataset, row["generation"], row["label"]
        )
    assert [row["generation"] for row in rows] == one_by_one(model, tokenizer, [r["prompt"] for r in rows], 4)


def test_evaluate_dataset_reports_both_protocols(monkeypatch):
    generations = ["The correct answer is True", "that is untrue", "the correct answer is false"]
    monkeypatch.setattr("nlsflow.evaluation.generation.generate", lambda *args, **kwargs: generations)
    records = [{"instruction": "q", "answer": answer} for answer in ("true", "false", "false")]
    rows = evaluate_dataset(
        None, None, EVAL_DATASETS["boolq"], records, max_new_tokens=4, num_beams=1, batch_size=2, progress=False
    )
    assert [(row["prediction"], row["correct"]) for row in rows] == [(None, False), ("true", False), ("false", True)]
    assert [(row["strict_prediction"], row["strict_correct"]) for row in rows] == [
        ("true", True),
        (None, False),
        ("false", True),
    ]
