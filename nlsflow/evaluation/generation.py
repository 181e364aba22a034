"""Batched greedy/beam generation and scoring of one evaluation set."""

from __future__ import annotations

import contextlib
import logging

import torch
from tqdm.auto import tqdm

from nlsflow.data.datasets import EvalDataset, generate_prompt
from nlsflow.evaluation.answers import score, score_strict

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _left_padded(tokenizer):
    """Left padding (and a pad token, when the tokenizer has none) for the block only."""
    saved_padding_side, saved_pad_token = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # only masked positions ever see it
    try:
        yield
    finally:
        tokenizer.padding_side, tokenizer.pad_token = saved_padding_side, saved_pad_token


def longest_first_batches(tokenizer, prompts: list[str], batch_size: int) -> list[list[int]]:
    """Prompt indices in batches, longest prompts first (a batch that does not fit in memory fails at once)."""
    lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def generate(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int,
    num_beams: int = 1,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "generate",
) -> list[str]:
    """The text each prompt's generation adds (special tokens dropped), in the order of `prompts`.

    Deterministic (no sampling): greedy when `num_beams == 1`, beam search otherwise. Prompts are
    batched longest first, left-padded. Works for plain transformers models and `peft.PeftModel`s.
    The model is put in eval mode and the tokenizer's padding side (and pad token, when it has none)
    set for the call only.
    """
    if not prompts:
        return []
    texts = [""] * len(prompts)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        bar = tqdm(total=len(prompts), desc=desc, disable=not progress)
        with _left_padded(tokenizer), torch.inference_mode(), bar:
            for batch in longest_first_batches(tokenizer, prompts, batch_size):
                encoded = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True)
                input_ids = encoded["input_ids"].to(device)
                output_ids = model.generate(
                    input_ids=input_ids,
                    attention_mask=encoded["attention_mask"].to(device),
                    max_new_tokens=max_new_tokens,
                    num_beams=num_beams,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )
                new_texts = tokenizer.batch_decode(output_ids[:, input_ids.shape[1] :], skip_special_tokens=True)
                for index, text in zip(batch, new_texts):
                    texts[index] = text
                bar.update(len(batch))
    finally:
        model.train(was_training)
    return texts


def generate_with_decoder(
    decoder,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "generate",
) -> list[str]:
    """`generate`'s greedy texts through a `deploy.timing.Decoder` (e.g. an OpenVINO export): the same batches and
    padding; a row ends at the tokenizer's EOS, a batch when every row has."""
    if not prompts:
        return []
    texts = [""] * len(prompts)
    with _left_padded(tokenizer), tqdm(total=len(prompts), desc=desc, disable=not progress) as bar:
        for batch in longest_first_batches(tokenizer, prompts, batch_size):
            encoded = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True)
            tokens = [decoder.prefill(encoded["input_ids"], encoded["attention_mask"])]
            done = tokens[0][:, 0] == tokenizer.eos_token_id
            while len(tokens) < max_new_tokens and not done.all():
                tokens.append(decoder.decode(tokens[-1]))
                done |= tokens[-1][:, 0] == tokenizer.eos_token_id
            for index, row in zip(batch, torch.cat(tokens, dim=1).tolist()):
                end = row.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in row else len(row)
                texts[index] = tokenizer.decode(row[:end], skip_special_tokens=True)
            bar.update(len(batch))
    return texts


def evaluate_dataset(
    model,
    tokenizer,
    dataset: EvalDataset,
    records: list[dict],
    *,
    max_new_tokens: int,
    num_beams: int,
    batch_size: int,
    progress: bool = True,
    decoder=None,
) -> list[dict]:
    """Generate an answer for every record and score it; one row per record, in record order.

    With a `decoder` (and `model` None), generation is greedy through it (`generate_with_decoder`).

    `prediction`/`correct` follow the reference (LLM-Adapters) protocol, `strict_prediction`/
    `strict_correct` the strict one (see `nlsflow.evaluation.answers`), side by side.
    """
    prompts = [generate_prompt(r["instruction"], r.get("input", "")) for r in records]
    if decoder is not None:
        if num_beams != 1:
            raise ValueError(f"num_beams={num_beams}: generation through a decoder is greedy only")
        generations = generate_with_decoder(
            decoder,
            tokenizer,
            prompts,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            progress=progress,
            desc=dataset.name,
        )
    else:
        generations = generate(
            model,
            tokenizer,
            prompts,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            batch_size=batch_size,
            progress=progress,
            desc=dataset.name,
        )
    rows = []
    for index, (record, prompt, generation) in enumerate(zip(records, prompts, generations)):
        label = str(record["answer"])
        prediction, correct = score(dataset, generation, label)
        strict_prediction, strict_correct = score_strict(dataset, generation, label)
        rows.append(
            {
                "task": dataset.name,
                "index": index,
                "prompt": prompt,
                "generation": generation,
                "prediction": prediction,
                "label": label,
                "correct": correct,
                "strict_prediction": strict_prediction,
                "strict_correct": strict_correct,
            }
        )
    if rows:
        accuracy = sum(row["correct"] for row in rows) / len(rows)
        strict_accuracy = sum(row["strict_correct"] for row in rows) / len(rows)
        logger.info(
            "%s: accuracy %.4f (strict %.4f) over %d records", dataset.name, accuracy, strict_accuracy, len(rows)
        )
    return rows
