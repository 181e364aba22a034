"""Stage 2, train: the method's super-adapter on the frozen pruned base; every step trains a random subnet.

Writes `train/adapter/` (PEFT format; NOLA: its coefficients, seed and shapes), `train/search_space.json`,
`train/training_log.parquet` and `train/validation.parquet` (the held-out slice the search scores subnets on),
plus what the method keeps of its own (HeteroLoRA: `heterolora.json`, `heterolora_log.parquet`).

One process trains here; with `train.processes` > 1 or `train.accelerate_config`, `accelerate launch` starts the
processes (stages/train_worker.py), which run the same `train` and write through the main one. Checkpoints
(`train.checkpoint_every`, and on SIGTERM/Ctrl-C) live in `<run_dir>/.cache/train-<key>/`: a re-run resumes there.
"""

from __future__ import annotations

import logging
import re
import socket
import subprocess
import sys
from pathlib import Path

import yaml

from nlsflow.artifacts import read_manifest, stage_dir, write_table
from nlsflow.checkpoints import Checkpoints
from nlsflow.config import dump_config
from nlsflow.errors import NlsflowError
from nlsflow.interrupts import StageStopped, deferred_stop
from nlsflow.io import atomic_write_text, folder_bytes, sha256_json
from nlsflow.methods import method_for
from nlsflow.models import load_causal_lm, load_tokenizer, resolve_device
from nlsflow.training import TrainingData, make_accelerator, split_records, train_supernet, unshard_for_saving
from schemas import PipelineConfig
from schemas.outputs import PruneOutput, TrainOutput
from stages._common import StageContext, main, setup_runtime

VALIDATION_COLUMNS = ("source", "instruction", "input", "output", "answer")
log = logging.getLogger("nlsflow")
WORKER_FAILURE = re.compile(r"^rank (\d+) failed: (.*)$")  # what stages.train_worker prints on an error


def run(ctx: StageContext) -> TrainOutput:
    if launches_processes(ctx.cfg):
        return launch(ctx.cfg, ctx.out_dir)
    return train(ctx.cfg, ctx.out_dir)


def train(cfg: PipelineConfig, out_dir: Path | None) -> TrainOutput | None:
    """Train in this process (one of several under a launcher); the main process writes `out_dir` and returns
    the output, the others None."""
    setup_runtime(cfg)  # every process draws the adapter's initial weights alike
    method = method_for(cfg)
    accelerator = make_accelerator(cfg.train, resolve_device(cfg.device).type, method)
    base_dir, files = str(stage_dir(cfg.run_dir, "prune") / PruneOutput.files.model), TrainOutput.files
    tokenizer, model = load_tokenizer(base_dir), load_causal_lm(base_dir, cfg.dtype, accelerator.device)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    train_records, val_records, contamination = split_records(cfg, Path(cfg.data.root))
    data = TrainingData.prepare(train_records, tokenizer, cfg.train, cfg.seed, accelerator.device)

    net = method.build(model, data.scoring_batches)
    checkpoints = checkpoints_of(cfg)
    result = train_supernet(method, net, data, cfg.train, cfg.seed, accelerator, checkpoints)
    unshard_for_saving(accelerator, result.wrapped)
    if not accelerator.is_main_process:
        return None

    method_metrics = method.save(net, out_dir)
    write_table(out_dir / files.training_log, "training_log", result.log_rows)
    validation = [{k: r[k] for k in VALIDATION_COLUMNS} for r in val_records]
    write_table(out_dir / files.validation, "records", validation)
    checkpoints.clear()
    return TrainOutput(
        steps=result.steps,
        final_loss=result.final_loss,
        trainable_params=method.trainable_count(net),
        adapter=method.adapter_kind,
        adapter_bytes=folder_bytes(out_dir / files.adapter),
        train_records=len(train_records),
        val_records=len(val_records),
        search_variables=len(net.space),
        width_variables=sum(v.kind == "width" for v in net.space),
        train_sets=cfg.data.train_sets,
        contamination=contamination,
        resumed_from_step=result.resumed_from,
        processes=accelerator.num_processes,
        **method_metrics,
    )


def checkpoints_of(cfg: PipelineConfig) -> Checkpoints:
    """The run's checkpoint folder, keyed by what the result depends on: the train settings and the pruned base."""
    prune = read_manifest(stage_dir(cfg.run_dir, "prune"), "prune", verify=False)
    key = sha256_json({"config": cfg.stage_config("train"), "prune": prune.fingerprint()})[:16]
    folder = Path(cfg.run_dir) / ".cache" / f"train-{key}"
    return Checkpoints(folder, key, cfg.train.checkpoint_every, cfg.train.keep_checkpoints)


# --- several processes: accelerate's launcher ------------------------------------------------------------------


def launches_processes(cfg: PipelineConfig) -> bool:
    return cfg.train.processes > 1 or cfg.train.accelerate_config is not None


def launch_args(cfg: PipelineConfig) -> list[str]:
    """`accelerate launch` options: the run's accelerate config file if any (FSDP, DeepSpeed, machines), else
    plain DDP on this machine; `train.processes` per machine; the mixed precision of the run."""
    tc = cfg.train
    args = ["--mixed_precision", tc.mixed_precision, "--dynamo_backend", "no"]
    machines = 1
    if tc.accelerate_config:
        path = Path(tc.accelerate_config).expanduser()
        try:
            machines = int((yaml.safe_load(path.read_text()) or {}).get("num_machines", 1))
        except (OSError, yaml.YAMLError, ValueError, AttributeError) as e:
            raise NlsflowError(
                f"train.accelerate_config {path} cannot be read ({e}); write one with `accelerate config`"
            ) from None
        args += ["--config_file", str(path)]
    else:
        args += ["--multi_gpu", "--num_machines", "1"]
    if machines == 1:  # a free port: two runs on one machine must not meet at accelerate's default
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            args += ["--main_process_port", str(s.getsockname()[1])]
    return [*args, "--num_processes", str(tc.processes * machines)]


def check_gpus(cfg: PipelineConfig) -> None:
    """On CUDA, one process per visible GPU at most (a container sees the GPUs its runner was given)."""
    import torch

    device = resolve_device(cfg.device)
    if device.type == "cuda" and cfg.train.processes > torch.cuda.device_count():
        raise NlsflowError(
            f"train.processes={cfg.train.processes} but {torch.cuda.device_count()} GPU(s) are visible here; lower "
            "train.processes or give the stage more GPUs (CUDA_VISIBLE_DEVICES, or GPUS=N with RUNNER=docker)"
        )


def launch(cfg: PipelineConfig, out_dir: Path) -> TrainOutput:
    """Run `train` in `train.processes` processes through `accelerate launch`; their output streams through."""
    check_gpus(cfg)
    key = checkpoints_of(cfg).key
    config_file = Path(cfg.run_dir) / ".cache" / f"train-{key}.config.yaml"
    result_file = config_file.with_name(f"train-{key}.result.json")
    atomic_write_text(config_file, dump_config(cfg))
    result_file.unlink(missing_ok=True)
    command = [
        *[sys.executable, "-m", "accelerate.commands.launch", *launch_args(cfg)],
        *[
            "-m",
            "stages.train_worker",
            "--config",
            str(config_file),
            "--out",
            str(out_dir),
            "--result",
            str(result_file),
        ],
    ]
    log.info(
        "train: starting %d processes per machine through accelerate launch (another machine joins with "
        "`accelerate launch --machine_rank N ... -m stages.train_worker --config %s`)",
        cfg.train.processes,
        config_file,
    )
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    failures = []
    with deferred_stop(forward=proc.send_signal) as stop:  # the launcher passes it on; the workers checkpoint
        for line in proc.stdout:
            sys.stderr.write(line)
            if match := WORKER_FAILURE.match(line.strip()):
                failures.append(f"{match[2]} (training process {match[1]})")
        code = proc.wait()
    if stop.signum is not None:
        raise StageStopped(stop.signum)
    if code != 0:
        raise NlsflowError(failures[0] if failures else f"the training processes failed (exit {code}); see above")
    output = TrainOutput.model_validate_json(result_file.read_text())
    result_file.unlink()
    config_file.unlink()
    return output


if __name__ == "__main__":
    raise SystemExit(main("train", run))
