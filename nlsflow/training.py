"""The training loop of every method: one sampled subnet per optimizer step, with the method's hooks.

    train_records, val_records, contamination = split_records(cfg, data_root)
    data = TrainingData.prepare(train_records, tokenizer, cfg.train, cfg.seed, device)
    result = train_supernet(method, net, data, cfg.train, cfg.seed)

The loop draws each step's subnet from a `random.Random(seed)` and each epoch's order from a seeded torch
generator, so a run is reproducible from its config. Methods change what trains (`Method.build`), which
parameters the optimizer holds (`Method.trainable_parameters`) and what happens before a step (`Method.hooks`);
the loop itself never asks which method runs.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.utils import parametrize
from tqdm.auto import tqdm
from transformers import DataCollatorForSeq2Seq, get_linear_schedule_with_warmup

from nlsflow.adapters.elastic import activate, random_subnet
from nlsflow.data.datasets import check_contamination, load_train_records, split_validation, tokenize_for_training
from nlsflow.errors import NlsflowError
from nlsflow.methods.base import Method, Supernet
from schemas.config import PipelineConfig, TrainConfig


def split_records(cfg: PipelineConfig, data_root: Path) -> tuple[list[dict], list[dict], dict]:
    """(training records, the held-out validation slice, the contamination report) of the run's training sets."""
    tc = cfg.train
    records = load_train_records(data_root, cfg.data.train_sets, download=cfg.data.download)
    records, contamination = check_contamination(records, data_root, mode=cfg.data.contamination)
    train_records, val_records = split_validation(records, tc.val_size, cfg.seed)
    train_records = train_records[: tc.max_train_samples]
    if len(train_records) < tc.batch_size:
        raise NlsflowError(
            f"{len(train_records)} training records left after holding out {len(val_records)}: fewer than "
            f"train.batch_size={tc.batch_size}; lower train.batch_size or train.val_size"
        )
    return train_records, val_records, contamination


@dataclass
class TrainingData:
    """Tokenized training examples and how to batch them."""

    examples: list[dict[str, list[int]]]
    collate: DataCollatorForSeq2Seq
    micro_batch_size: int
    seed: int
    device: torch.device

    @classmethod
    def prepare(cls, records: list[dict], tokenizer, tc: TrainConfig, seed: int, device) -> TrainingData:
        examples = [tokenize_for_training(tokenizer, r, tc.cutoff_len, tc.train_on_inputs) for r in records]
        collate = DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, return_tensors="pt", padding=True)
        return cls(examples, collate, tc.micro_batch_size, seed, device)

    def batch(self, ids: list[int]) -> dict[str, torch.Tensor]:
        return self.collate([self.examples[j] for j in ids]).to(self.device)

    def scoring_batches(self, step: int, count: int) -> list[dict]:
        """`count` micro-batches of a fresh draw seeded by the step (HeteroLoRA's proxies score on them)."""
        ids = torch.randperm(len(self.examples), generator=torch.Generator().manual_seed(self.seed + step)).tolist()
        size = self.micro_batch_size
        return [self.batch(ids[i * size : (i + 1) * size]) for i in range(min(count, len(ids) // size))]


@dataclass
class TrainResult:
    steps: int
    steps_per_epoch: int
    log_rows: list[dict[str, Any]]  # the training_log table

    @property
    def final_loss(self) -> float:
        return self.log_rows[-1]["loss"]


def total_steps(num_examples: int, tc: TrainConfig) -> tuple[int, int]:
    """(optimizer steps, steps per epoch) for `tc.epochs` over `num_examples`, capped at `tc.max_steps`."""
    per_epoch = math.ceil(num_examples / tc.batch_size)
    steps = math.ceil(per_epoch * tc.epochs)
    return (steps if tc.max_steps is None else min(steps, tc.max_steps)), per_epoch


def train_supernet(method: Method, net: Supernet, data: TrainingData, tc: TrainConfig, seed: int) -> TrainResult:
    """Train the super-network: every optimizer step trains one random subnet on `tc.batch_size` sequences."""
    steps, steps_per_epoch = total_steps(len(data.examples), tc)
    params = method.trainable_parameters(net)
    optimizer = torch.optim.AdamW(params, lr=tc.learning_rate, weight_decay=tc.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, tc.warmup_steps, steps)
    subnet_rng, order_rng = random.Random(seed), torch.Generator().manual_seed(seed)
    hooks = method.hooks(net, steps_per_epoch, data.scoring_batches)
    net.model.train()
    log_rows, recent, order = [], [], []
    for step in tqdm(range(1, steps + 1), desc="train", unit="step"):
        for hook in hooks:
            hook.before_step(step, net)
        subnet = random_subnet(net.space, subnet_rng)
        activate(net.model, net.space, subnet)
        if len(order) < tc.batch_size:  # a new epoch: reshuffle (the remainder of the last one is dropped)
            order = torch.randperm(len(data.examples), generator=order_rng).tolist()
        batch_ids, order = order[: tc.batch_size], order[tc.batch_size :]
        loss_sum = 0.0
        for i in range(0, tc.batch_size, tc.micro_batch_size):
            batch = data.batch(batch_ids[i : i + tc.micro_batch_size])
            with parametrize.cached():  # NOLA: each factor is recombined once per forward, not at every access
                loss = net.model(**batch).loss * tc.micro_batch_size / tc.batch_size
                loss.backward()
            loss_sum += loss.item()
        if tc.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
        learning_rate = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        recent.append(loss_sum)
        if step % tc.log_every == 0 or step == steps:
            log_rows.append(
                {
                    "step": step,
                    "epoch": step / steps_per_epoch,
                    "loss": sum(recent) / len(recent),
                    "learning_rate": learning_rate,
                    "active_config": json.dumps(subnet),
                }
            )
            recent = []
    return TrainResult(steps, steps_per_epoch, log_rows)
