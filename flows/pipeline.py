"""The nlsflow pipeline: prune -> train -> evaluate -> search -> extract -> benchmark, one Prefect task per stage.

    python -m flows.pipeline --config configs/tasks/math.yaml --config configs/profiles/tiny.yaml run_dir=runs/math-tiny

A stage whose manifest already matches its config and its inputs' digests is skipped, so a re-run resumes.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.states import Failed

from flows.runners import get_runner
from flows.summary import render_summary, summary_markdown
from schemas import STAGES, NlsflowError, is_up_to_date, load_config, read_manifest, stage_dir
from schemas.config import dump_config
from schemas.io import atomic_write_text


@task(task_run_name="{stage}")
def run_stage(stage: str, config_file: Path, runner_name: str, force: bool = False) -> dict:
    """Run one stage through the runner unless it is up to date; return its status, time and metrics."""
    logger = get_run_logger()
    cfg = load_config([config_file])
    if not force and is_up_to_date(Path(cfg.run_dir), stage, cfg.stage_config(stage)):
        logger.info("%s is up to date: skipped", stage)
        status = "skipped"
    else:
        try:
            get_runner(runner_name).run(stage, config_file, logger.info, force=force)
        except NlsflowError as e:  # the stage already said why: fail the task with that line, no traceback
            return Failed(message=str(e))
        status = "ran"
    manifest = read_manifest(stage_dir(cfg.run_dir, stage), stage, verify=False)
    return {"stage": stage, "status": status, "stage_seconds": manifest.duration_s, "metrics": manifest.metrics}


@flow(name="nlsflow-pipeline", log_prints=True)
def pipeline(config_files: list[str], overrides: list[str] | None = None, runner: str = "local",
             force: bool = False) -> list[dict]:
    """Resolve the config once, write it to <run_dir>/config.yaml, and run the six stages in order."""
    cfg = load_config([Path(p) for p in config_files], overrides or [])
    config_file = Path(cfg.run_dir) / "config.yaml"
    atomic_write_text(config_file, dump_config(cfg))
    results = []
    for stage in STAGES:
        state = run_stage(stage, config_file, runner, force, return_state=True)
        if state.is_failed():
            return Failed(message=state.message)  # later stages would only fail on the missing input
        results.append(state.result())
    create_markdown_artifact(summary_markdown(results), key="nlsflow-summary", description=f"{cfg.task} / {cfg.profile} / {cfg.method}")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", required=True, help="YAML file(s), merged in order")
    parser.add_argument("--runner", default="local", help="where stages run: local (default)")
    parser.add_argument("--force", action="store_true", help="re-run every stage")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. prune.sparsity=0.6")
    args = parser.parse_args(argv)
    try:
        state = pipeline(args.config, args.overrides, args.runner, args.force, return_state=True)
    except NlsflowError as e:  # a config error, before any stage ran
        print(f"error: {e}", file=sys.stderr)
        return 2
    if state.is_failed():
        print(f"error: {state.message}", file=sys.stderr)
        return 2
    render_summary(state.result())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
