"""What every stage shares: CLI parsing, resume check, atomic stage folder, manifest writing."""

from __future__ import annotations

import argparse
import logging
import random
import shutil
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from nlsflow.artifacts import (
    check_replaceable,
    describe_plan,
    list_outputs,
    read_inputs,
    rerun_reason,
    stage_dir,
    stage_plan,
    write_manifest,
)
from nlsflow.cli import expand_args
from nlsflow.config import load_config
from nlsflow.errors import NlsflowError, format_validation_error, storage_error
from nlsflow.interrupts import StageStopped, stop_handlers
from nlsflow.io import atomic_dir, atomic_write_text
from nlsflow.runlock import hold_run_folder
from schemas import STAGE_INPUTS, STAGE_OUTPUTS, Manifest, PipelineConfig, StageOutput

log = logging.getLogger("nlsflow")


@dataclass
class StageContext:
    """What a stage's `run` gets: the config, where to write, and its upstream manifests, outputs and folders."""

    cfg: PipelineConfig
    stage: str
    out_dir: Path
    inputs: dict[str, Manifest] = field(default_factory=dict)

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run_dir)

    def input_dir(self, stage: str) -> Path:
        return stage_dir(self.run_dir, stage)

    def output(self, stage: str) -> StageOutput:
        """An upstream stage's typed outputs, e.g. `ctx.output("evaluate").subnet` (schemas.outputs)."""
        return self.inputs[stage].output

    @property
    def data_root(self) -> Path:
        return Path(self.cfg.data.root)


# A stage returns its output model (schemas.outputs); a dict of the same keys is still taken and validated.
StageFn = Callable[[StageContext], StageOutput | dict[str, Any]]


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("nlsflow", "torch", "transformers", "peft", "pymoo"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def setup_runtime(cfg: PipelineConfig) -> None:
    import numpy as np
    import torch

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)


def _as_output(stage: str, result: BaseModel | dict[str, Any]) -> BaseModel:
    """The stage's return value as its output model: checked, or validated from a dict."""
    model = STAGE_OUTPUTS[stage]
    if isinstance(result, BaseModel):
        if not isinstance(result, model):
            raise TypeError(f"the '{stage}' stage returned a {type(result).__name__}, expected {model.__name__}")
        return result
    try:
        return model.model_validate(result)
    except ValidationError as e:
        raise NlsflowError(
            f"the '{stage}' stage's metrics do not fit {model.__name__} (schemas/outputs.py): "
            f"{format_validation_error(e)}"
        ) from None


def run_stage(stage: str, fn: StageFn, cfg: PipelineConfig, force: bool = False) -> Manifest | None:
    """Run one stage unless its manifest already matches; returns the new manifest, or None when skipped.

    It holds the run folder's lock throughout (a pipeline's stages share the pipeline's), and refuses inputs that do
    not belong together or a stage folder holding files it did not write.
    """
    run_dir = Path(cfg.run_dir)

    def pending() -> str | None:
        reason = "--force" if force else rerun_reason(run_dir, stage, cfg)
        return None if reason is None else f"'{stage}' needs to run ({reason})"

    with hold_run_folder(run_dir, f"python -m stages.{stage}", pending):
        reason = "--force" if force else rerun_reason(run_dir, stage, cfg)
        if reason is None:
            log.info("%s: up to date, skipped", stage)
            return None
        log.info("%s: running (%s)", stage, reason)
        return _run(stage, fn, cfg, run_dir)


def _run(stage: str, fn: StageFn, cfg: PipelineConfig, run_dir: Path) -> Manifest:
    inputs = read_inputs(run_dir, stage, cfg)
    check_replaceable(stage_dir(run_dir, stage), stage)
    for stale in run_dir.glob(f".{stage}.*.tmp"):  # left by a killed run of this stage (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    setup_runtime(cfg)
    start = time.perf_counter()
    with atomic_dir(stage_dir(run_dir, stage)) as tmp:
        output = _as_output(stage, fn(StageContext(cfg=cfg, stage=stage, out_dir=tmp, inputs=inputs)))
        manifest = Manifest(
            stage=stage,
            config=cfg.stage_config(stage),
            inputs={k: m.fingerprint() for k, m in inputs.items()},
            outputs=list_outputs(tmp),
            metrics=output.model_dump(mode="json"),
            duration_s=round(time.perf_counter() - start, 3),
            versions=_versions(),
        )
        write_manifest(tmp, manifest)
    (run_dir / f"{stage}.error.log").unlink(missing_ok=True)  # a stale trace from an earlier failure
    log.info("%s: done in %.1fs", stage, manifest.duration_s)
    return manifest


def main(stage: str, fn: StageFn, argv: list[str] | None = None) -> int:
    """A stage's command line: one line on any error; SIGINT/SIGTERM stop it cleanly (exit 128 + the signal)."""
    try:
        with stop_handlers():
            return _main(stage, fn, argv)
    except StageStopped as e:
        print(f"error: {stage}: {e}; the stage wrote nothing (re-run the same command to resume)", file=sys.stderr)
        return e.exit_code


def _main(stage: str, fn: StageFn, argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(
        prog=f"python -m stages.{stage}",
        description=f"nlsflow stage '{stage}' (reads: {', '.join(STAGE_INPUTS[stage]) or 'nothing'})",
    )
    parser.add_argument("--config", action="append", type=Path, required=True, help="YAML file(s), merged in order")
    parser.add_argument("--force", action="store_true", help="run even if the manifest is up to date")
    parser.add_argument(
        "--plan", action="store_true", help="check the config; say whether the stage would run, and why"
    )
    parser.add_argument("overrides", nargs="*", help="dotted key=value, e.g. prune.sparsity=0.6")
    try:
        argv = expand_args(sys.argv[1:] if argv is None else argv)  # make's ARGS, as one `--args TEXT`
    except NlsflowError as e:
        print(f"error: {stage}: {e}", file=sys.stderr)
        return 2
    args = parser.parse_intermixed_args(argv)  # key=value overrides may come before or after flags
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    warnings.filterwarnings(
        "ignore", message=".*is_gradient_checkpointing.*"
    )  # raised inside PEFT, not actionable here
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file loading bars drown the stage's own progress
    for noisy in ("httpx", "urllib3", "filelock", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        cfg = load_config(args.config, args.overrides)
    except NlsflowError as e:
        print(f"error: {stage}: {e}", file=sys.stderr)
        return 2
    if args.plan:
        print(describe_plan(cfg, stage_plan(cfg, [stage], args.force)))
        return 0
    log.info("run folder: %s", cfg.run_dir)
    try:
        run_stage(stage, fn, cfg, force=args.force)
    except NlsflowError as e:
        print(f"error: {stage}: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if line := storage_error(e):
            print(f"error: {stage}: {line}", file=sys.stderr)
            return 2
        return _with_trace(stage, cfg, e)
    except ValueError as e:  # bad input caught deep in a library: one line here, the trace in a file
        return _with_trace(stage, cfg, e)
    return 0


def _with_trace(stage: str, cfg: PipelineConfig, e: Exception) -> int:
    trace = Path(cfg.run_dir) / f"{stage}.error.log"
    try:
        atomic_write_text(trace, traceback.format_exc())
        where = f" (traceback: {trace})"
    except OSError:
        where = ""
    print(f"error: {stage}: {e}{where}", file=sys.stderr)
    return 2
