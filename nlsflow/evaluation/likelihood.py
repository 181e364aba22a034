"""Score multiple-choice records by likelihood instead of by what the model generates.

`rank_labels` asks which answer the model finds likeliest in the trained format: after the evaluation prompt, the
response "the correct answer is <label>" for each label the record names (lm-eval scores MMLU's letters this way).
It measures the choice with the format taken out: a base model that never answers in the expected form still gets
a fair score. The prompt is tokenized alone and the response after it, as training tokenizes them
(`tokenize_for_training`, split).

`rank_options` is lm-eval's zero-shot protocol: no template, each option's own text after the question
(`choices.cloze`), the likeliest option taken by summed log-probability (acc) and by log-probability per character
of the option's text (acc_norm). It measures what the model knows of the question rather than what it learned of a
format: a base model scores above chance on it where it has the knowledge.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from nlsflow.data.datasets import generate_prompt
from nlsflow.evaluation.choices import CLOZE_NORMALIZED, RESPONSE, cloze, parse_choices


@torch.no_grad()
def continuation_logprobs(
    model,
    pairs: list[tuple[list[int], list[int]]],
    *,
    batch_size: int = 8,
    pad_id: int = 0,
    desc: str = "score",
    progress: bool = True,
) -> list[float]:
    """The summed log-probability of each continuation given its context, token ids in, in the order of `pairs`.

    Batched longest first and right-padded: a padded position comes after every scored one, so it changes nothing
    a causal model computes for them."""
    device = next(model.parameters()).device
    order = sorted(range(len(pairs)), key=lambda i: -sum(map(len, pairs[i])))
    scores = [0.0] * len(pairs)
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False, disable=not progress):
            batch = order[start : start + batch_size]
            sequences = [pairs[i][0] + pairs[i][1] for i in batch]
            width = max(map(len, sequences))
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long, device=device)
            mask = torch.zeros_like(ids)
            for row, sequence in enumerate(sequences):
                ids[row, : len(sequence)] = torch.tensor(sequence)
                mask[row, : len(sequence)] = 1
            logprobs = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
            for row, i in enumerate(batch):
                context, continuation = pairs[i]
                positions = torch.arange(len(context) - 1, len(context) + len(continuation) - 1, device=device)
                targets = torch.tensor(continuation, device=device)
                scores[i] = logprobs[row, positions, targets].sum().item()
    finally:
        model.train(was_training)
    return scores


def rank_labels(model, tokenizer, records: list[dict], *, batch_size: int = 8, desc: str = "rank labels") -> list[dict]:
    """One row per multiple-choice record, in record order: the label whose response the model finds likeliest
    (`prediction`), and whether it is the record's answer (`correct`)."""
    pairs, spans = [], []
    for record in records:
        choices = parse_choices(record["instruction"])
        if choices is None:
            raise ValueError(f"not a multiple-choice record (no 'Answer format' line): {record['instruction'][:80]!r}")
        prompt_ids = tokenizer(generate_prompt(record["instruction"], record.get("input", "")))["input_ids"]
        spans.append((len(pairs), choices.labels))
        pairs += [
            (prompt_ids, tokenizer(RESPONSE.format(label), add_special_tokens=False)["input_ids"])
            for label in choices.labels
        ]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    scores = continuation_logprobs(model, pairs, batch_size=batch_size, pad_id=pad_id, desc=desc)
    rows = []
    for index, (record, (first, labels)) in enumerate(zip(records, spans)):
        label_scores = scores[first : first + len(labels)]
        prediction = labels[max(range(len(labels)), key=label_scores.__getitem__)]
        rows.append({"index": index, "prediction": prediction, "correct": prediction == str(record["answer"])})
    return rows


def _cloze_ids(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split: the context's trailing spaces move to the continuation, the pair is tokenized whole, and the
    continuation is what follows the context's own tokens (a token merged across the boundary goes with it)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation)["input_ids"]
    context_ids = tokenizer(context)["input_ids"]
    return whole[: len(context_ids)], whole[len(context_ids) :]


def rank_options(
    model,
    tokenizer,
    records: list[dict],
    source: str,
    *,
    batch_size: int = 8,
    desc: str = "rank options",
    progress: bool = True,
) -> list[dict]:
    """One row per multiple-choice record of `source`, in record order: the likeliest option's label by summed
    log-probability (`prediction`, `correct`), by log-probability per character of the option's text, as lm-eval
    normalizes (`prediction_norm`, `correct_norm`), and by the one lm-eval reports for `source` (`cloze_prediction`,
    `cloze_correct`: acc_norm where it has it, `choices.CLOZE_NORMALIZED`, acc elsewhere)."""
    pairs, spans = [], []
    for record in records:
        choices = parse_choices(record["instruction"])
        if choices is None:
            raise ValueError(f"not a multiple-choice record (no 'Answer format' line): {record['instruction'][:80]!r}")
        options = cloze(choices, source)
        spans.append((len(pairs), choices.labels, [len(text.lstrip()) for _, text in options]))
        pairs += [_cloze_ids(tokenizer, context, continuation) for context, continuation in options]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    scores = continuation_logprobs(model, pairs, batch_size=batch_size, pad_id=pad_id, desc=desc, progress=progress)
    headline = "_norm" if source in CLOZE_NORMALIZED else ""
    rows = []
    for index, (record, (first, labels, sizes)) in enumerate(zip(records, spans)):
        summed = scores[first : first + len(labels)]
        per_char = [score / size for score, size in zip(summed, sizes)]
        best = labels[max(range(len(labels)), key=summed.__getitem__)]
        best_norm = labels[max(range(len(labels)), key=per_char.__getitem__)]
        answer = str(record["answer"])
        rows.append(
            {
                "index": index,
                "prediction": best,
                "correct": best == answer,
                "prediction_norm": best_norm,
                "correct_norm": best_norm == answer,
            }
        )
        rows[-1].update(
            cloze_prediction=rows[-1][f"prediction{headline}"], cloze_correct=rows[-1][f"correct{headline}"]
        )
    return rows
