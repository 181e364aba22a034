"""The nlsflow pipeline: prune -> train -> evaluate -> search -> extract -> benchmark, one Prefect task per stage.

    python -m flows.pipeline --task math --profile tiny --method shears run_dir=runs/math-tiny-shears
    python -m flows.pipeline --config configs/tasks/math.yaml --config configs/profiles/tiny.yaml run_dir=runs/math-tiny

A stage whose manifest already matches its config and its inputs' digests is skipped, so a re-run resumes.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.states import Failed

from flows.runners import RUNNERS, get_runner
from flows.signals import start_ephemeral_server_shielded, stop_signal
from flows.stage_process import StageInterrupted
from flows.summary import accuracy_table, benchmark_markdown, pareto_table, render_summary, summary_markdown
from nlsflow.artifacts import describe_plan, read_manifest, read_table, rerun_reason, stage_dir, stage_plan
from nlsflow.cli import expand_args
from nlsflow.config import load_config, write_run_config
from nlsflow.errors import NlsflowError, storage_error
from nlsflow.layers import config_files
from nlsflow.models import check_model_source
from nlsflow.runlock import hold_run_folder
from schemas import STAGES, PipelineConfig

PROGRESS = re.compile(r"^(train|search):\s+(\d+)%\|")  # the stages' tqdm bars, as streamed by the runner


def _interrupted(task, task_run, state) -> bool:
    """Retry a stage only when its process was killed or its engine failed (StageInterrupted), not on a real error."""
    try:
        state.result()
    except StageInterrupted:
        return True
    except BaseException:
        return False
    return False


# Resume is by content: a stage is skipped when its manifest matches its config and its inputs' digests
# (nlsflow.artifacts.rerun_reason), so Prefect's own result cache stays off: it could not see a deleted run folder.
@task(task_run_name="{stage}", retries=2, retry_delay_seconds=5, retry_condition_fn=_interrupted, cache_policy=None)
def run_stage(
    stage: str, config_file: Path, runner_name: str, force: bool = False, runner_options: dict | None = None
) -> dict:
    """Run one stage through the runner unless it is up to date; return its status, time and metrics."""
    logger = get_run_logger()
    cfg = load_config([config_file])
    reason = "--force" if force else rerun_reason(Path(cfg.run_dir), stage, cfg)
    if reason is None:
        logger.info("%s is up to date: skipped", stage)
        status = "skipped"
    else:
        logger.info("%s: running (%s)", stage, reason)
        progress = {}

        def log(line: str) -> None:
            logger.info(line)
            if (match := PROGRESS.match(line)) and match[1] == stage:
                if stage not in progress:
                    progress[stage] = create_progress_artifact(
                        0.0, key=f"{stage}-progress", description=f"{stage} progress"
                    )
                update_progress_artifact(progress[stage], float(match[2]))

        try:
            get_runner(runner_name, runner_options).run(stage, config_file, log, force=force)
        except NlsflowError as e:  # the stage already said why: fail the task with that line, no traceback
            return Failed(message=str(e))
        status = "ran"
    manifest = read_manifest(stage_dir(cfg.run_dir, stage), stage, verify=False)
    return {"stage": stage, "status": status, "stage_seconds": manifest.duration_s, "metrics": manifest.metrics}


@flow(name="nlsflow-pipeline", log_prints=True)
def pipeline(
    config_files: list[str],
    overrides: list[str] | None = None,
    runner: str = "local",
    force: bool = False,
    runner_options: dict | None = None,
) -> list[dict]:
    """Resolve the config once, write it to <run_dir>/config.yaml, and run the six stages in order.

    `runner` is local (subprocesses) or docker (a container per stage; `runner_options` gives its image, gpus,
    mounts, env, network: see flows/docker_runner.py).
    """
    cfg = load_config([Path(p) for p in config_files], overrides or [])
    get_runner(runner, runner_options)  # an unknown runner or a bad option fails here, before any stage
    results = []
    with hold_run_folder(Path(cfg.run_dir), "flows.pipeline", lambda: pending_stage(cfg, force)):
        config_file = write_run_config(cfg)
        for stage in STAGES:
            state = run_stage(stage, config_file, runner, force, runner_options, return_state=True)
            if state.is_failed():
                return Failed(message=state.message)  # later stages would only fail on the missing input
            results.append(state.result())
    about = f"{cfg.task} / {cfg.profile} / {cfg.method.name}"
    create_markdown_artifact(summary_markdown(results), key="nlsflow-summary", description=about)
    create_table_artifact(
        accuracy_table(results), key="nlsflow-accuracy", description=f"accuracy per test set, {about}"
    )
    evaluations = read_table(stage_dir(cfg.run_dir, "search") / "evaluations.parquet", "evaluations").to_pylist()
    create_table_artifact(
        pareto_table(evaluations),
        key="nlsflow-pareto-front",
        description=f"search: Pareto-optimal subnets (accuracy vs cost), {about}",
    )
    create_markdown_artifact(
        benchmark_markdown(stage_dir(cfg.run_dir, "benchmark")),
        key="nlsflow-benchmark",
        description=f"benchmark: every variant, {about}",
    )
    return results


def pending_stage(cfg: PipelineConfig, force: bool) -> str | None:
    """The first stage that would write into the run folder, and why; None when every stage is up to date."""
    return next((f"'{stage}' needs to run ({why})" for stage, why in stage_plan(cfg, force=force) if why), None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", default=[], help="YAML file(s), merged in order")
    parser.add_argument(
        "--task", help="with --profile and --method: the files nlsflow/layers.py names, before any --config"
    )
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--method", default="shears")
    parser.add_argument(
        "--runner",
        default="local",
        choices=sorted(RUNNERS),
        help="where stages run: local subprocesses (default) or a container per stage",
    )
    parser.add_argument("--gpus", help="docker: GPUs per stage container: all, a count, device=0,1, or none (default)")
    parser.add_argument(
        "--image", help="docker: image name with {stage}, default nlsflow-{stage}:cpu (:cuda with --gpus)"
    )
    parser.add_argument("--mount", action="append", default=[], help="docker: extra /host[:/container][:ro] mount")
    parser.add_argument("--force", action="store_true", help="re-run every stage")
    parser.add_argument("--plan", action="store_true", help="check the config; say which stages would run and why")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. prune.sparsity=0.6")
    try:
        argv = expand_args(sys.argv[1:] if argv is None else argv)  # make's ARGS, as one `--args TEXT`
    except NlsflowError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args = parser.parse_intermixed_args(argv)  # key=value overrides may come before or after flags
    try:
        files = [*(config_files(args.task, args.profile, args.method) if args.task else []), *args.config]
        if not files:
            parser.error("give --task (with --profile, --method) or --config")
        options = {k: v for k, v in {"gpus": args.gpus, "image": args.image, "mounts": args.mount}.items() if v}
        if options and args.runner != "docker":
            parser.error("--gpus, --image and --mount apply to --runner docker only")
        cfg = load_config(files, args.overrides)  # a config error: one line, before the Prefect server starts
        check_model_source(cfg.model.name_or_path, cfg.model.gguf_file)  # a folder that is not a model, likewise
        if args.plan:  # nothing written, no server, no engine
            print(describe_plan(cfg, stage_plan(cfg, force=args.force)))
            return 0
        print(f"run folder: {cfg.run_dir}", file=sys.stderr)
        # held here so a second run is refused before any server starts; the flow's stages share it
        with hold_run_folder(Path(cfg.run_dir), " ".join(sys.argv), lambda: pending_stage(cfg, args.force)):
            write_run_config(cfg)  # refuses a user's own config.yaml there, before the server starts
            start_ephemeral_server_shielded()  # Ctrl-C reaches the stage, not the embedded server
            state = pipeline(list(map(str, files)), args.overrides, args.runner, args.force, options, return_state=True)
    except NlsflowError as e:  # a config error, a busy or read-only run folder: before any stage ran
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if line := storage_error(e):
            print(f"error: {line}", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:  # outside a stage (the server starting, between stages): nothing half-written
        print("error: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    if state.is_failed():
        print(f"error: {state.message}", file=sys.stderr)
        return 128 + signum if (signum := stop_signal()) else 2
    render_summary(state.result())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
