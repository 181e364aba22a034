"""Training step time: the elastic super-adapter, built as `train` builds it, vs plain PEFT LoRA at the same ranks.

Same base model, same batch (train.batch_size sequences of train.cutoff_len random token ids, in micro-batches of
train.micro_batch_size), forward + backward + gradient clipping + AdamW step. The elastic steps include
`activate`, which `train` calls every step. Sparsity-preserving masking (Shears) is not part of this comparison.
"""

from __future__ import annotations

import random

import torch
from peft import get_peft_model

from bench.context import BenchContext
from bench.runner import alternate, ratio_at_most, row, timed
from nlsflow.adapters.elastic import activate, maximal_subnet, pattern_key, random_subnet
from nlsflow.deploy.timing import median_spread


def _stepper(
    model, micro_batches: list[dict], steps: int, max_grad_norm: float | None, lr: float, device, before=lambda: None
):
    """A function timing `steps` optimizer steps of `model` on `micro_batches`; returns ms per step."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    scale = 1 / len(micro_batches)

    def step():
        before()
        for batch in micro_batches:
            (model(**batch).loss * scale).backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def measure() -> float:
        return timed(lambda: [step() for _ in range(steps)], device) / steps * 1e3

    return measure


def run(ctx: BenchContext) -> list[dict]:
    cfg, tc, s = ctx.cfg, ctx.cfg.train, ctx.settings
    elastic, space = ctx.supernet(random_b=False, seed=cfg.seed)
    subnet = random_subnet(space, random.Random(cfg.seed))
    ranks = {pattern_key(name): subnet[v.name] for v in space for name in v.modules}
    plain_max = get_peft_model(ctx.load_base(), ctx.lora_config())
    plain_sub = get_peft_model(ctx.load_base(), ctx.lora_config(ranks))
    ids = torch.randint(
        4, elastic.config.vocab_size, (tc.batch_size, tc.cutoff_len), generator=torch.Generator().manual_seed(cfg.seed)
    ).to(ctx.device)
    micro_batches = [
        {"input_ids": ids[i : i + tc.micro_batch_size], "labels": ids[i : i + tc.micro_batch_size]}
        for i in range(0, tc.batch_size, tc.micro_batch_size)
    ]
    for model in (elastic, plain_max, plain_sub):
        model.train()

    def stepper(model, before=lambda: None):
        return _stepper(model, micro_batches, s.train_steps, tc.max_grad_norm, tc.learning_rate, ctx.device, before)

    results = alternate(
        {
            "elastic max": stepper(elastic, lambda: activate(elastic, space, maximal_subnet(space))),
            "peft max": stepper(plain_max),
            "elastic subnet": stepper(elastic, lambda: activate(elastic, space, subnet)),
            "peft subnet": stepper(plain_sub),
        },
        s.repeats,
        s.warmup,
        desc="bench: training steps",
    )
    note = (
        f"batch {tc.batch_size} x {tc.cutoff_len} tokens (micro-batch {tc.micro_batch_size}), "
        f"{s.train_steps} step(s) per measurement, AdamW"
    )
    target = ratio_at_most(1.05)
    return [
        row(
            "training step",
            "elastic super-adapter, maximal subnet",
            f"PEFT LoRA r={tc.rank}",
            "step time",
            "ms",
            median_spread(results["elastic max"]),
            median_spread(results["peft max"]),
            s.repeats,
            target,
            note,
        ),
        row(
            "training step",
            f"elastic super-adapter, random subnet (seed {cfg.seed})",
            "PEFT LoRA, same ranks (rank_pattern)",
            "step time",
            "ms",
            median_spread(results["elastic subnet"]),
            median_spread(results["peft subnet"]),
            s.repeats,
            target,
            note,
        ),
    ]
