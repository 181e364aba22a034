"""Generation speed at batch 1: the merged extracted model vs the base model and vs the unmerged PEFT model.

The adapter is made as the pipeline makes it: the super-adapter (random non-zero lora_B) is sliced at the heuristic
subnet by `extract_sub_adapter` into a stock PEFT folder, loaded with `PeftModel.from_pretrained` (unmerged) and
merged with `merge_and_unload`. Timed with the shared greedy protocol of `nlsflow.deploy.timing` (random prompt of
benchmark.prompt_len tokens, benchmark.new_tokens new ones, tokens/s end to end).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from peft import PeftModel

from bench.context import BenchContext
from bench.runner import alternate, equal_within, no_worse, row
from nlsflow.adapters.elastic import extract_sub_adapter, heuristic_subnet
from nlsflow.deploy.timing import TorchDecoder, repeat_timing, summarize


def greedy_tokens(model, input_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """The `new_tokens` greedy tokens of `model` after `input_ids` [1, n], through TorchDecoder."""
    decoder = TorchDecoder(model)
    tokens = [decoder.prefill(input_ids, torch.ones_like(input_ids))]
    for _ in range(new_tokens - 1):
        tokens.append(decoder.decode(tokens[-1]))
    return torch.cat(tokens, dim=1)


def models(ctx: BenchContext) -> dict[str, object]:
    """{"base", "merged", "unmerged"}: the base, and the heuristic sub-adapter merged into it and on it."""
    supernet, space = ctx.supernet(random_b=True, seed=ctx.cfg.seed)
    with tempfile.TemporaryDirectory() as tmp:
        extract_sub_adapter(supernet, space, heuristic_subnet(space), Path(tmp) / "adapter")
        unmerged = PeftModel.from_pretrained(ctx.load_base(), Path(tmp) / "adapter").eval()
        merged = PeftModel.from_pretrained(ctx.load_base(), Path(tmp) / "adapter").merge_and_unload().eval()
    return {"base": ctx.load_base(), "merged": merged, "unmerged": unmerged}


def run(ctx: BenchContext) -> list[dict]:
    bc, s = ctx.cfg.benchmark, ctx.settings
    variants = models(ctx)
    ids = torch.randint(
        4, variants["base"].config.vocab_size, (1, bc.prompt_len), generator=torch.Generator().manual_seed(0)
    ).to(ctx.device)
    mask = torch.ones_like(ids)
    same = torch.equal(
        greedy_tokens(variants["merged"], ids, bc.new_tokens), greedy_tokens(variants["unmerged"], ids, bc.new_tokens)
    )
    decoders = {name: TorchDecoder(model) for name, model in variants.items()}
    timings = alternate(
        {
            name: (lambda d=d: repeat_timing(d, ids, mask, bc.new_tokens, warmup=0, repeats=1)[0])
            for name, d in decoders.items()
        },
        s.repeats,
        s.warmup,
        desc="bench: generation",
    )
    speed = {name: summarize(t) for name, t in timings.items()}

    def tokens_per_s(name):
        return speed[name]["tokens_per_s"], speed[name]["tokens_per_s_spread"]

    note = (
        f"batch 1, {bc.prompt_len}-token prompt, {bc.new_tokens} new tokens, heuristic sub-adapter; merged and "
        f"unmerged greedy tokens {'identical' if same else 'DIFFER'}"
    )
    return [
        row(
            "generation",
            "merged extracted model",
            "base model",
            "tokens per second",
            "tok/s",
            tokens_per_s("merged"),
            tokens_per_s("base"),
            s.repeats,
            equal_within(0.05),
            note,
        ),
        row(
            "generation",
            "merged extracted model",
            "base + unmerged PEFT adapter",
            "tokens per second",
            "tok/s",
            tokens_per_s("merged"),
            tokens_per_s("unmerged"),
            s.repeats,
            no_worse(lower_is_better=False),
            note,
        ),
    ]
