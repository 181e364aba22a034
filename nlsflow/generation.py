"""Batched greedy/beam generation and scoring of one evaluation set."""
from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from nlsflow.answers import score, score_strict
from nlsflow.data import EvalDataset, generate_prompt

logger = logging.getLogger(__name__)


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
    batched longest first, left-padded, so a batch that does not fit in memory fails at once.
    Works for plain transformers models and `peft.PeftModel`s. The model is put in eval mode and
    the tokenizer's padding side (and pad token, when it has none) set for the call only.
    """
    if not prompts:
        return []
    lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    device = next(model.parameters()).device
    texts = [""] * len(prompts)

    saved_padding_side, saved_pad_token, was_training = tokenizer.padding_side, tokenizer.pad_token, model.training
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # only masked positions ever see it
    model.eval()
    try:
        with torch.inference_mode(), tqdm(total=len(prompts), desc=desc, disable=not progress) as bar:
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
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
        tokenizer.padding_side = saved_padding_side
        tokenizer.pad_token = saved_pad_token
        model.train(was_training)
    return texts


def generate_with_decoder(decoder, tokenizer, prompts: list[str], *, max_new_tokens: int, progress: bool = True,
                          desc: str = "generate") -> list[str]:
    """Greedy generation through a `nlsflow.timing.Decoder` (e.g. an OpenVINO export), one prompt at a time (no
    padding to get right), stopping at the tokenizer's EOS: the text each prompt's generation adds."""
    texts = []
    for prompt in tqdm(prompts, desc=desc, disable=not progress):
        input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        token, new = decoder.prefill(input_ids, torch.ones_like(input_ids)), []
        while int(token) != tokenizer.eos_token_id:
            new.append(int(token))
            if len(new) == max_new_tokens:
                break
            token = decoder.decode(token)
        texts.append(tokenizer.decode(new, skip_special_tokens=True))
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
    `strict_correct` the strict one (see `nlsflow.answers`), side by side.
    """
    prompts = [generate_prompt(r["instruction"], r.get("input", "")) for r in records]
    if decoder is not None:
        if num_beams != 1:
            raise ValueError(f"num_beams={num_beams}: generation through a decoder is greedy only")
        generations = generate_with_decoder(decoder, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                            progress=progress, desc=dataset.name)
    else:
        generations = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, num_beams=num_beams,
                               batch_size=batch_size, progress=progress, desc=dataset.name)
    rows = []
    for index, (record, prompt, generation) in enumerate(zip(records, prompts, generations)):
        label = str(record["answer"])
        prediction, correct = score(dataset, generation, label)
        strict_prediction, strict_correct = score_strict(dataset, generation, label)
        rows.append({"task": dataset.name, "index": index, "prompt": prompt, "generation": generation,
                     "prediction": prediction, "label": label, "correct": correct,
                     "strict_prediction": strict_prediction, "strict_correct": strict_correct})
    if rows:
        accuracy = sum(row["correct"] for row in rows) / len(rows)
        strict_accuracy = sum(row["strict_correct"] for row in rows) / len(rows)
        logger.info("%s: accuracy %.4f (strict %.4f) over %d records", dataset.name, accuracy, strict_accuracy,
                    len(rows))
    return rows
