"""The training loop of every method: one sampled subnet per optimizer step, with the method's hooks.

    train_records, val_records, contamination = split_records(cfg, data_root)
    data = TrainingData.prepare(train_records, tokenizer, cfg.train, cfg.seed, device)
    result = train_supernet(method, net, data, cfg.train, cfg.seed)

Each step's subnet, global batch and micro-batch RNG (dropout) are functions of (seed, step), so a run is
reproducible from its config, every process of a distributed run trains the same subnet, and a resumed run
continues exactly where the checkpoint left it. The loop runs on accelerate (`make_accelerator`): one CPU or GPU,
DDP over N processes, FSDP or DeepSpeed as the launch configures. Methods change what trains (`Method.build`), which
parameters the optimizer holds (`Method.trainable_parameters`) and what happens before a step (`Method.hooks`);
the loop itself never asks which method runs.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import random
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.nn.utils import parametrize
from tqdm.auto import tqdm
from transformers import DataCollatorForSeq2Seq, get_linear_schedule_with_warmup

from nlsflow.adapters.elastic import activate, random_subnet
from nlsflow.checkpoints import Checkpoints
from nlsflow.data.datasets import check_contamination, load_train_records, split_validation, tokenize_for_training
from nlsflow.errors import NlsflowError
from nlsflow.interrupts import StageStopped, deferred_stop
from nlsflow.methods.base import Method, Supernet
from schemas.config import PipelineConfig, TrainConfig

if TYPE_CHECKING:
    from accelerate import Accelerator


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
        examples = [
            tokenize_for_training(tokenizer, r, tc.cutoff_len, tc.train_on_inputs, tc.tokenize) for r in records
        ]
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
    resumed_from: int = 0  # the checkpoint's step this run continued from (0: from the start)
    wrapped: torch.nn.Module | None = None  # the model as accelerate prepared it (DDP, FSDP, DeepSpeed)

    @property
    def final_loss(self) -> float:
        return self.log_rows[-1]["loss"]


def total_steps(num_examples: int, tc: TrainConfig) -> tuple[int, int]:
    """(optimizer steps, steps per epoch) for `tc.epochs` over `num_examples`, capped at `tc.max_steps`.

    An epoch is `num_examples // batch_size` steps: the remainder of each shuffled order is dropped."""
    per_epoch = max(1, num_examples // tc.batch_size)
    steps = math.ceil(per_epoch * tc.epochs)
    return (steps if tc.max_steps is None else min(steps, tc.max_steps)), per_epoch


def step_subnet(space, seed: int, step: int) -> dict[str, int]:
    """The subnet every process trains at `step`: a function of (seed, step) alone, so ranks and resumes agree."""
    return random_subnet(space, random.Random(f"subnet:{seed}:{step}"))


def step_batch(num_examples: int, batch_size: int, seed: int, step: int) -> list[int]:
    """The global batch of `step` (1-based): its slice of the epoch's seeded order."""
    per_epoch = max(1, num_examples // batch_size)
    epoch, position = divmod(step - 1, per_epoch)
    order = _epoch_order(num_examples, seed, epoch)
    return order[position * batch_size : (position + 1) * batch_size]


@functools.lru_cache(maxsize=2)
def _epoch_order(num_examples: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


def micro_batch_seed(seed: int, step: int, index: int) -> int:
    """Seeds the RNG (dropout) of the global batch's `index`-th micro-batch: the same on any number of processes."""
    return (seed * 1_000_003 + step) * 4099 + index


def make_accelerator(tc: TrainConfig, device: str, method: Method) -> Accelerator:
    """The accelerate engine of a training run: this process's device and rank, DDP/FSDP/DeepSpeed as launched."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs

    if "WORLD_SIZE" not in os.environ:  # one process that may train again (tests, notebooks): a fresh engine state
        AcceleratorState._reset_state(reset_partial_state=True)
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=method.may_leave_parameters_unused)]
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision=tc.mixed_precision, kwargs_handlers=handlers)
    sharded = [n for n in ("FSDP", "DEEPSPEED") if os.environ.get(f"ACCELERATE_USE_{n}", "").lower() == "true"]
    if sharded and accelerator.distributed_type.name not in sharded and accelerator.is_main_process:
        logging.getLogger("nlsflow").warning(
            "the accelerate config asks for %s, which accelerate runs on GPUs only: training with %s here",
            sharded[0],
            accelerator.distributed_type.name,
        )
    if accelerator.is_fsdp2:
        raise NlsflowError(
            "the accelerate config asks for FSDP version 2, which training does not support yet; set "
            "fsdp_version: 1 (as configs/accelerate/fsdp.yaml does)"
        )
    return accelerator


def leave_process_group() -> None:
    """End this process's part in the launched run once its collectives are done: gloo's threads, left to the
    interpreter's teardown, may abort the process ("terminate called without an active exception", pytorch#190489)
    after it trained to the end. No process group: nothing."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def unshard_for_saving(accelerator: Accelerator, wrapped: torch.nn.Module) -> None:
    """After training, for `Method.save`: the main process's unwrapped model holds its trained parameters whole and
    no FSDP wrapper is left in its module tree (FSDP shards the parameters and renames the modules; DeepSpeed ZeRO-3
    partitions them). Every process must call it; the model is not for training afterwards. Elsewhere: nothing."""
    from accelerate.utils import DistributedType

    trained = [p for p in wrapped.parameters() if p.requires_grad]
    if accelerator.distributed_type == DistributedType.FSDP:
        from torch.distributed.fsdp import FullyShardedDataParallel

        gather = FullyShardedDataParallel.summon_full_params(  # CUDA: gathered into host memory
            wrapped, writeback=False, rank0_only=True, offload_to_cpu=accelerator.device.type == "cuda"
        )
    elif (
        accelerator.distributed_type == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage == 3
    ):
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(trained, modifier_rank=None)
    else:
        return
    with gather:
        whole = [p.detach().clone() for p in trained] if accelerator.is_main_process else []
    for p, tensor in zip(trained, whole):
        p.data = tensor
    if accelerator.is_main_process and isinstance(wrapped, torch.nn.Module):
        _drop_fsdp_wrappers(accelerator.unwrap_model(wrapped))


def _drop_fsdp_wrappers(module: torch.nn.Module) -> None:
    """Put each FSDP-wrapped submodule back in its parent's place, so names and state dicts are the model's own."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    for name, child in list(module.named_children()):
        while isinstance(child, FullyShardedDataParallel):
            child = child.module
            setattr(module, name, child)
        _drop_fsdp_wrappers(child)


def train_supernet(
    method: Method,
    net: Supernet,
    data: TrainingData,
    tc: TrainConfig,
    seed: int,
    accelerator: Accelerator | None = None,
    checkpoints: Checkpoints | None = None,
) -> TrainResult:
    """Train the super-network: every optimizer step trains one subnet on `tc.batch_size` sequences.

    Under accelerate with N processes each computes every N-th micro-batch of the same global batch, and the
    gradients are averaged: the result does not depend on N beyond float rounding. With `checkpoints`, the run
    resumes from the newest one and saves every `tc.checkpoint_every` steps and when stopped (SIGTERM, Ctrl-C).
    """
    from accelerate.utils import DistributedType

    accelerator = accelerator or make_accelerator(tc, data.device.type, method)
    world, rank = accelerator.num_processes, accelerator.process_index
    micro = tc.micro_batch_size
    if tc.batch_size % (micro * world):
        raise NlsflowError(
            f"train.batch_size={tc.batch_size} does not split into micro-batches of {micro} over {world} processes; "
            "make batch_size a multiple of micro_batch_size x processes"
        )
    steps, steps_per_epoch = total_steps(len(data.examples), tc)
    params = method.trainable_parameters(net)
    inside = {id(p) for p in net.model.parameters()}
    outside = [p for p in params if id(p) not in inside]  # not synced by DDP
    optimizer = torch.optim.AdamW(params, lr=tc.learning_rate, weight_decay=tc.weight_decay)
    if accelerator.distributed_type == DistributedType.FSDP:  # LoRA's layers in FSDP units of their own (PEFT's recipe)
        from peft.utils.other import fsdp_auto_wrap_policy

        accelerator.state.fsdp_plugin.auto_wrap_policy = fsdp_auto_wrap_policy(net.model)
    model, optimizer = accelerator.prepare(net.model, optimizer)
    scheduler = get_linear_schedule_with_warmup(optimizer.optimizer, tc.warmup_steps, steps)  # one step per step
    hooks = method.hooks(net, steps_per_epoch, data.scoring_batches)
    state = LoopState()
    if checkpoints is not None:
        checkpoints.attach(accelerator, params, scheduler, *hooks, state)
        checkpoints.resume()
    net.model.train()
    progress = tqdm(
        range(state.step + 1, steps + 1),
        desc="train",
        unit="step",
        initial=state.step,
        total=steps,
        disable=not accelerator.is_main_process,
    )
    with deferred_stop() as stop:
        for step in progress:
            for hook in hooks:
                if hook.before_step(step, net):
                    follow_main_process(hook, accelerator)
            subnet = step_subnet(net.space, seed, step)
            same_on_every_rank(subnet, accelerator, "subnet")
            activate(net.model, net.space, subnet)
            ids = step_batch(len(data.examples), tc.batch_size, seed, step)
            mine = list(range(0, tc.batch_size, micro))[rank::world]  # this process's micro-batches
            loss_sum = torch.zeros((), device=accelerator.device)
            for j, start in enumerate(mine):
                torch.manual_seed(micro_batch_seed(seed, step, start // micro))
                last = j == len(mine) - 1
                with contextlib.ExitStack() as scope:
                    if not last:  # gradients are all-reduced once, after the last micro-batch
                        scope.enter_context(accelerator.no_sync(model))
                    scope.enter_context(parametrize.cached())  # NOLA: factors recombined once per forward
                    batch = data.batch(ids[start : start + micro])
                    loss = model(**batch).loss * micro * world / tc.batch_size
                    accelerator.backward(loss)
                loss_sum += loss.detach() / world
            _average_outside(outside, accelerator)
            if tc.max_grad_norm is not None:
                accelerator.clip_grad_norm_(params, tc.max_grad_norm)
            learning_rate = scheduler.get_last_lr()[0]
            optimizer.step()
            if not accelerator.optimizer_step_was_skipped:  # fp16: a step with inf gradients is skipped
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.recent.append(accelerator.reduce(loss_sum, reduction="sum").item())
            if step % tc.log_every == 0 or step == steps:
                state.log_rows.append(
                    {
                        "step": step,
                        "epoch": step / steps_per_epoch,
                        "loss": sum(state.recent) / len(state.recent),
                        "learning_rate": learning_rate,
                        "active_config": json.dumps(subnet),
                    }
                )
                state.recent = []
                progress.set_postfix(loss=f"{state.log_rows[-1]['loss']:.4f}", refresh=False)  # shown at the next tick
            state.step = step
            stopping = _anyone(stop.signum is not None, accelerator)
            if checkpoints is not None and (stopping or checkpoints.due(step)):
                checkpoints.save(step)
            if stopping:
                raise StageStopped(stop.signum or signal.SIGTERM)
    resumed = checkpoints.resumed if checkpoints else 0
    return TrainResult(steps, steps_per_epoch, state.log_rows, resumed, model)


@dataclass
class LoopState:
    """What the loop carries from step to step beyond the weights: checkpointed with them."""

    step: int = 0
    log_rows: list[dict[str, Any]] = field(default_factory=list)
    recent: list[float] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "log_rows": self.log_rows, "recent": self.recent}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.log_rows, self.recent = state["step"], list(state["log_rows"]), list(state["recent"])


def same_on_every_rank(value: Any, accelerator: Accelerator, what: str) -> None:
    """Refuse to go on when the processes hold different `value`s: they must train the same subnet at each step."""
    if accelerator.num_processes == 1:
        return
    from accelerate.utils import gather_object

    seen = gather_object([json.dumps(value, sort_keys=True)])
    if len(set(seen)) > 1:
        raise NlsflowError(
            f"the processes disagree on the {what} at this step ({' vs '.join(sorted(set(seen)))}); a bug: please "
            "report it with the run's config"
        )


def follow_main_process(hook, accelerator: Accelerator) -> None:
    """Give every process the main process's state of `hook`."""
    if accelerator.num_processes == 1:
        return
    from accelerate.utils import broadcast_object_list

    state = [hook.state_dict() if accelerator.is_main_process else None]
    hook.load_state_dict(broadcast_object_list(state, from_process=0)[0])


def _average_outside(params: list[torch.nn.Parameter], accelerator: Accelerator) -> None:
    """Average the gradients DDP does not see (parameters outside the wrapped model: HeteroLoRA's shortcuts)."""
    if accelerator.num_processes == 1:
        return
    for p in params:
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        p.grad = accelerator.reduce(grad, reduction="mean")


def _anyone(flag: bool, accelerator: Accelerator) -> bool:
    """True on every process when it is true on any (all stop at the same step)."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), reduction="sum").item())
