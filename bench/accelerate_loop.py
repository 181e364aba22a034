"""The training loop on accelerate: against the plain PyTorch loop it replaced, over processes, and its checkpoints.

All three train the profile method's super-network (`method_for(cfg).build`, seeded as `train` seeds it) on the
bench's (dense) base model and the first training records, `TrainingData` prepared as `train` prepares it.

- training loop: `nlsflow.training.train_supernet` in 1 process, with a `Checkpoints` as `train` passes it (never
  due here), vs `plain_train` below: the same steps without an Accelerator (the same subnets, global batches,
  dropout seeds, loss scaling, clipping, AdamW and warm-up schedule), which trains identical weights
  (tests/test_bench.py). Setup (optimizer, Accelerator) is not timed: from the first step's start to the loop's end.
- processes: the same steps in 2 processes (`accelerate launch` as `train.processes=2` starts it) vs 1, each run a
  fresh `bench.train_worker` that times its steps after a warm-up step (process start and model load excluded).
- checkpoint: one `Checkpoints.save` (accelerate `save_state`: trained parameters, AdamW moments, scheduler, RNG,
  loop state) after the training-loop runs vs saving the adapter alone (`save_pretrained`); time and size on disk.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn.utils import parametrize
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from bench.context import BenchContext
from bench.runner import alternate, ratio_at_most, row, timed
from nlsflow.adapters.elastic import activate
from nlsflow.checkpoints import Checkpoints
from nlsflow.config import dump_config
from nlsflow.deploy.timing import median_spread
from nlsflow.errors import NlsflowError
from nlsflow.io import atomic_write_text, folder_bytes
from nlsflow.methods import Method, Supernet, TrainHook, method_for
from nlsflow.models import load_causal_lm, load_tokenizer
from nlsflow.training import (
    TrainingData,
    TrainResult,
    micro_batch_seed,
    step_batch,
    step_subnet,
    total_steps,
    train_supernet,
)
from schemas import PipelineConfig
from schemas.config import TrainConfig
from stages._common import setup_runtime
from stages.train import WORKER_FAILURE, launch_args

REPO = Path(__file__).resolve().parents[1]
WORKER_TIMEOUT_S = 1800  # one run: imports, model load and the steps (SmolLM2, 2 processes on 2 cores: ~1-2 min)


def build(
    cfg: PipelineConfig, method: Method, base_dir: str, revision: str | None, records: list[dict], device
) -> tuple[Supernet, TrainingData]:
    """The method's super-network on the base and the records' training data, as `train` builds them: seeded
    first, so every call (and every process) starts from the same weights."""
    setup_runtime(cfg)
    model = load_causal_lm(base_dir, cfg.dtype, device, revision)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    data = TrainingData.prepare(records, load_tokenizer(base_dir, revision), cfg.train, cfg.seed, device)
    return method.build(model, data.scoring_batches), data


def plain_train(method: Method, net: Supernet, data: TrainingData, tc: TrainConfig, seed: int) -> TrainResult:
    """`train_supernet` as it was before accelerate: one process, no Accelerator, the same seeded steps (subnet,
    global batch, dropout per micro-batch), loss scaling, gradient clipping, AdamW and schedule, progress bar and
    log."""
    steps, steps_per_epoch = total_steps(len(data.examples), tc)
    params = method.trainable_parameters(net)
    optimizer = torch.optim.AdamW(params, lr=tc.learning_rate, weight_decay=tc.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, tc.warmup_steps, steps)
    hooks = method.hooks(net, steps_per_epoch, data.scoring_batches)
    micro, log_rows, recent = tc.micro_batch_size, [], []
    net.model.train()
    for step in tqdm(range(1, steps + 1), desc="train", unit="step"):
        for hook in hooks:
            hook.before_step(step, net)
        subnet = step_subnet(net.space, seed, step)
        activate(net.model, net.space, subnet)
        ids = step_batch(len(data.examples), tc.batch_size, seed, step)
        loss_sum = torch.zeros((), device=data.device)
        for start in range(0, tc.batch_size, micro):
            torch.manual_seed(micro_batch_seed(seed, step, start // micro))
            with parametrize.cached():
                loss = net.model(**data.batch(ids[start : start + micro])).loss * micro / tc.batch_size
                loss.backward()
            loss_sum += loss.detach()
        if tc.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
        learning_rate = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        recent.append(loss_sum.item())
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


class StepClock(TrainHook):
    """Put first among a method's hooks: the start of every step (both loops read their loss every step, which
    waits for the device)."""

    def __init__(self):
        self.starts: list[float] = []

    def before_step(self, step: int, net: Supernet) -> bool:
        self.starts.append(time.perf_counter())
        return False  # changed nothing that trains


def ms_per_step(loop: Callable[..., TrainResult], method: Method, *args, skip: int = 0, **kwargs) -> float:
    """Mean ms per optimizer step of `loop(method, *args, **kwargs)` from the start of step `skip + 1` to its end."""
    clock, clocked = StepClock(), copy.copy(method)
    clocked.hooks = lambda *hook_args: [clock, *method.hooks(*hook_args)]
    loop(clocked, *args, **kwargs)
    return (time.perf_counter() - clock.starts[skip]) / (len(clock.starts) - skip) * 1e3


def run(ctx: BenchContext) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="nlsflow-bench-") as tmp:
        loop_rows, checkpoint_rows = _loop_and_checkpoint(ctx, Path(tmp))
        return [*loop_rows, *_processes(ctx, Path(tmp)), *checkpoint_rows]


def _loop_and_checkpoint(ctx: BenchContext, tmp: Path) -> tuple[list[dict], list[dict]]:
    cfg, s = ctx.cfg, ctx.settings
    tc = cfg.train.model_copy(update={"max_steps": s.loop_steps})
    records = ctx.records[: tc.batch_size * s.loop_steps]  # one epoch of exactly the timed steps
    method = method_for(cfg)
    (accelerated, data), (plain, _) = (
        build(cfg, method, ctx.base_dir, ctx.revision, records, ctx.device) for _ in range(2)
    )
    attached: list[Checkpoints] = []

    def on_accelerate() -> float:
        attached.append(Checkpoints(tmp / "checkpoints", "bench", every=None, keep=1))
        return ms_per_step(train_supernet, method, accelerated, data, tc, cfg.seed, checkpoints=attached[-1])

    steps = alternate(
        {
            "accelerate": on_accelerate,
            "plain": lambda: ms_per_step(plain_train, method, plain, data, tc, cfg.seed),
        },
        s.repeats,
        s.warmup,
        desc="bench: training loop",
    )
    loop_note = (
        f"{method.name} on the dense base, batch {tc.batch_size} x ≤{tc.cutoff_len} tokens of training records "
        f"(micro-batch {tc.micro_batch_size}), {s.loop_steps} step(s) per measurement, each a random subnet; "
        "setup (optimizer, Accelerator) not timed; both loops train identical weights"
    )
    loop_rows = [
        row(
            "training loop",
            "train_supernet on accelerate, 1 process",
            "plain PyTorch loop (no Accelerator)",
            "step time",
            "ms",
            median_spread(steps["accelerate"]),
            median_spread(steps["plain"]),
            s.repeats,
            ratio_at_most(1.02),
            loop_note,
        )
    ]

    checkpoints, saved = attached[-1], itertools.count(s.loop_steps + 1)  # its accelerator holds the trained state
    adapters = (tmp / "adapter" / str(i) for i in itertools.count())
    seconds = alternate(
        {
            "checkpoint": lambda: timed(lambda: checkpoints.save(next(saved)), ctx.device),
            "adapter": lambda: timed(lambda: method.save_adapter(accelerated, next(adapters)), ctx.device),
        },
        s.repeats,
        s.warmup,
        desc="bench: checkpoint",
    )
    mb = folder_bytes(checkpoints.complete()[-1]) / 1e6, folder_bytes(tmp / "adapter" / "0") / 1e6
    ours, peer = "Checkpoints.save (accelerate save_state)", "the adapter alone (save_pretrained)"
    checkpoint_note = (
        f"{method.trainable_count(accelerated):,} trained parameters, their AdamW moments, scheduler, RNG states and "
        f"loop state, after {s.loop_steps} steps, vs the adapter's weights in PEFT format; into a temporary folder in "
        f"{tmp.parent}"
    )
    checkpoint_rows = [
        row(
            "checkpoint",
            ours,
            peer,
            "save time",
            "s",
            median_spread(seconds["checkpoint"]),
            median_spread(seconds["adapter"]),
            s.repeats,
            note=checkpoint_note,
        ),
        row("checkpoint", ours, peer, "size on disk", "MB", (mb[0], 0), (mb[1], 0), s.repeats, note=checkpoint_note),
    ]
    return loop_rows, checkpoint_rows


def _processes(ctx: BenchContext, tmp: Path) -> list[dict]:
    """2 processes vs 1 on the same global batch, in micro-batches both can split (each worker times itself)."""
    cfg, tc, s = ctx.cfg, ctx.cfg.train, ctx.settings
    micro = tc.micro_batch_size if tc.batch_size % (2 * tc.micro_batch_size) == 0 else tc.batch_size // 2
    steps = 1 + s.process_steps  # a warm-up step, then the timed ones
    records = tmp / "records.json"
    atomic_write_text(records, json.dumps(ctx.records[: tc.batch_size * steps]))
    cores = len(os.sched_getaffinity(0))
    threads = cfg.num_threads or cores

    def on(processes: int) -> Callable[[], dict]:
        run_cfg = cfg.model_copy(
            update={
                "num_threads": max(1, threads // processes),
                "train": tc.model_copy(update={"max_steps": steps, "micro_batch_size": micro, "processes": processes}),
            }
        )
        config, result = tmp / f"config-{processes}.yaml", tmp / f"result-{processes}.json"
        atomic_write_text(config, dump_config(run_cfg))
        worker = ["-m", "bench.train_worker", "--config", str(config), "--base-dir", str(ctx.base_dir)]
        worker += ["--records", str(records), "--result", str(result)]
        worker += ["--revision", ctx.revision] if ctx.revision else []

        def measure() -> dict:
            launcher = ["-m", "accelerate.commands.launch", *launch_args(run_cfg)] if processes > 1 else []
            result.unlink(missing_ok=True)
            run_worker([sys.executable, *launcher, *worker])
            return json.loads(result.read_text())

        return measure

    # every run is a fresh process that discards its own first step: no warm-up round
    results = alternate({"2": on(2), "1": on(1)}, s.repeats, 0, desc="bench: training processes")
    two, one = results["2"][-1], results["1"][-1]
    scaling = f"{cores} CPU cores cannot show GPU scaling; " if ctx.device.type == "cpu" else ""
    note = (
        f"{scaling}reported as measured. Batch {tc.batch_size} x ≤{tc.cutoff_len} tokens in micro-batches of {micro} "
        f"(each process computes its share); {two['threads']} thread(s) in each process vs {one['threads']}; "
        f"timed inside the worker over {s.process_steps} step(s) after a warm-up step (process start and model load "
        "excluded)"
    )
    return [
        row(
            "processes",
            "2 processes (accelerate launch, DDP)",
            "1 process",
            "step time",
            "ms",
            median_spread([r["ms_per_step"] for r in results["2"]]),
            median_spread([r["ms_per_step"] for r in results["1"]]),
            s.repeats,
            note=note,
        )
    ]


def run_worker(command: list[str], timeout: float = WORKER_TIMEOUT_S) -> None:
    """Run a bench worker from the repository root in its own process group, all of which is killed if it
    outlives `timeout` or the bench is interrupted; a failure is one line (the worker's own, if it printed one)."""
    proc = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise NlsflowError(f"a bench training worker ran over {timeout:.0f} s: {' '.join(command)}") from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if proc.returncode != 0:
        lines = [line.strip() for line in output.splitlines() if line.strip()]
        failures = [m[2] for line in lines if (m := WORKER_FAILURE.match(line))]
        reason = failures[0] if failures else (lines[-1] if lines else "no output")
        raise NlsflowError(f"a bench training worker failed (exit {proc.returncode}): {reason}")
