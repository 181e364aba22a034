"""Training on accelerate: N processes (gloo on CPU) reach the 1-process adapter, and a killed run resumes from its
checkpoint to the uninterrupted run's adapter, bit for bit on CPU."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, needs_data
from safetensors.torch import load_file
from test_methods import method_config

from nlsflow.artifacts import read_manifest, stage_dir
from nlsflow.config import write_run_config
from stages import prune
from stages._common import run_stage

pytestmark = needs_data

# 2 processes of micro-batches of 4 make the tiny profile's global batch of 8
STEPS = ("train.max_steps=6", "train.micro_batch_size=4")
METHODS = {
    "lora": (),
    "shears": (),
    "lonas": (),
    "nola": (),
    "heterolora": ("method.selection.mode=dynamic", "method.selection.realloc_every=0.0005"),
}


def _train(config_file, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "stages.train", "--config", str(config_file), "--force", *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _adapter(run_dir) -> dict[str, torch.Tensor]:
    folder = stage_dir(run_dir, "train") / "adapter"
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """One pruned tiny base per method's prune settings, shared by the tests of this module."""
    runs = {}
    for method, extra in METHODS.items():
        cfg = method_config(tmp_path_factory.mktemp(method), method, *STEPS, *extra)
        run_stage("prune", prune.run, cfg)
        runs[method] = cfg
    return runs


@pytest.mark.parametrize("method", METHODS)
def test_two_processes_reach_the_one_process_adapter(pruned, tmp_path, method):
    cfg = pruned[method]
    config_file = write_run_config(cfg)
    _train(config_file)
    one = _adapter(cfg.run_dir)
    two = _train(config_file, "train.processes=2")
    assert read_manifest(stage_dir(cfg.run_dir, "train"), "train").output.processes == 2
    # gradients summed in another order: equal up to float rounding (measured: 0.0 on this machine's CPU)
    assert _max_diff(one, _adapter(cfg.run_dir)) <= 1e-6, two.stderr[-2000:]


def _checkpointed(cfg, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(cfg.run_dir, run, ignore=shutil.ignore_patterns("train", ".cache", "config.yaml"))
    cfg = cfg.model_copy(update={"run_dir": str(run)})
    return cfg, write_run_config(cfg)


def _start(config_file, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "stages.train", "--config", str(config_file), *extra],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for(path_glob, run_dir, proc, timeout=300) -> None:
    deadline = time.monotonic() + timeout
    while not list(run_dir.glob(path_glob)):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.1)


@pytest.mark.parametrize(
    "stop, resume_with", [(signal.SIGKILL, "train.processes=1"), (signal.SIGTERM, "train.processes=2")]
)
def test_a_stopped_run_resumes_from_its_checkpoint_to_the_uninterrupted_adapter(pruned, tmp_path, stop, resume_with):
    cfg, config_file = _checkpointed(pruned["lora"], tmp_path)
    steps = ("train.max_steps=40", "train.checkpoint_every=5")
    _train(config_file, *steps)
    uninterrupted = _adapter(cfg.run_dir)
    log = (stage_dir(cfg.run_dir, "train") / "training_log.parquet").read_bytes()
    shutil.rmtree(stage_dir(cfg.run_dir, "train"))

    proc = _start(config_file, *steps)
    try:
        _wait_for(".cache/train-*/step-00000010/meta.json", Path(cfg.run_dir), proc)
        proc.send_signal(stop)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    if stop == signal.SIGTERM:  # it saved a checkpoint at the step it was in, then stopped with one line
        assert proc.returncode == 143, out[-2000:]
        assert [line for line in out.splitlines() if line.startswith("error:")] == [
            "error: train: stopped by SIGTERM; the stage wrote nothing (re-run the same command to resume)"
        ]
    assert not stage_dir(cfg.run_dir, "train").exists()

    resumed = subprocess.run(
        [sys.executable, "-m", "stages.train", "--config", str(config_file), *steps, resume_with],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    output = read_manifest(stage_dir(cfg.run_dir, "train"), "train").output
    assert output.resumed_from_step >= 10 and "resuming training from step" in resumed.stderr
    assert _max_diff(uninterrupted, _adapter(cfg.run_dir)) == 0.0
    assert (stage_dir(cfg.run_dir, "train") / "training_log.parquet").read_bytes() == log
    assert not list(Path(cfg.run_dir).glob(".cache/train-*")), "checkpoints are removed once the stage is done"


def test_a_checkpoint_of_other_settings_is_refused_with_one_line(pruned, tmp_path):
    cfg, config_file = _checkpointed(pruned["lora"], tmp_path)
    steps = ("train.max_steps=40", "train.checkpoint_every=5")
    proc = _start(config_file, *steps)
    try:
        _wait_for(".cache/train-*/step-00000005/meta.json", Path(cfg.run_dir), proc)
        proc.kill()
    finally:
        proc.kill()
        proc.wait()
    meta = next(Path(cfg.run_dir).glob(".cache/train-*/step-00000005/meta.json"))
    for newer in meta.parent.parent.glob("step-*"):  # only step 5 left: the one we alter
        if newer != meta.parent:
            shutil.rmtree(newer)
    meta.write_text(json.dumps({"key": "0123456789abcdef", "step": 5}))
    line = [line for line in _train(config_file, *steps, check=False).stderr.splitlines() if line.startswith("error:")]
    assert len(line) == 1 and "was saved by a run of other settings or inputs" in line[0] and "delete" in line[0]


def test_an_error_in_a_training_process_is_one_line(pruned, tmp_path):
    cfg, config_file = _checkpointed(pruned["lora"], tmp_path)
    proc = _train(config_file, "train.processes=2", "train.micro_batch_size=8", check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert "does not split into micro-batches of 8 over 2 processes" in errors[0]
    assert re.search(r"\(training process \d\)$", errors[0])


SAME_ON_EVERY_RANK = """
import sys
from pathlib import Path
from accelerate import Accelerator
from nlsflow.training import same_on_every_rank
a = Accelerator(cpu=True)
same_on_every_rank({"qkv": 8}, a, "subnet")
try:
    same_on_every_rank({"qkv": 8 if a.is_main_process else 4}, a, "subnet")
except Exception as e:
    Path(sys.argv[1], f"rank{a.process_index}.txt").write_text(str(e))
a.end_training()
"""


def _torchrun(script: Path, *args) -> subprocess.CompletedProcess:
    """`script` in 2 processes on this machine (gloo), as torchrun starts them."""
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_ranks_that_drew_different_subnets_are_caught(tmp_path):
    script = tmp_path / "check.py"
    script.write_text(SAME_ON_EVERY_RANK)
    _torchrun(script, tmp_path)
    for rank in (0, 1):  # each process refuses, with the one line naming both draws
        message = (tmp_path / f"rank{rank}.txt").read_text()
        assert message.startswith("the processes disagree on the subnet at this step") and '{"qkv": 4}' in message


def test_an_fsdp_sharded_adapter_is_saved_whole(tmp_path):
    """FSDP itself runs on CPU (accelerate only runs it on GPUs): a LoRA model sharded over 2 processes with PEFT's
    wrap policy, unsharded by `unshard_for_saving`, saves exactly the weights it had before sharding."""
    out = _torchrun(REPO / "tests" / "scripts" / "fsdp_unshard.py", tmp_path / "adapter").stdout
    assert "sharded 512 of 1024 trained values" in out and "max diff 0.0" in out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
@pytest.mark.parametrize("plugin", ["fsdp", "deepspeed"])
def test_fsdp_and_deepspeed_train_the_tiny_profile(pruned, tmp_path, plugin):
    """Smoke test: the accelerate config file picks FSDP or DeepSpeed ZeRO-2; the same code trains."""
    cfg, config_file = _checkpointed(pruned["lora"], tmp_path)
    accelerate_config = REPO / "configs" / "accelerate" / f"{plugin}.yaml"
    _train(config_file, f"train.accelerate_config={accelerate_config}", "train.processes=2", "device=cuda")
    assert read_manifest(stage_dir(cfg.run_dir, "train"), "train").output.processes == 2
