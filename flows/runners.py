"""Runners start one stage somewhere and stream its output: a local subprocess (the default), or a container."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from flows.signals import forward_stop_signals
from flows.stage_process import (
    REPO_ROOT,
    STAGE_ENV,
    StageInterrupted,
    StageRunner,
    StageStoppedBySignal,
    stage_command,
    stream_lines,
)
from nlsflow.errors import NlsflowError


class LocalRunner:
    """`python -m stages.<name>` as a subprocess of this interpreter, in the repository root."""

    name = "local"

    def run(self, stage: str, config_file: Path, log: Callable[[str], None], force: bool = False) -> None:
        env = STAGE_ENV | dict(os.environ)
        proc = subprocess.Popen(
            [sys.executable, *stage_command(stage, Path(config_file).resolve(), force)],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        with forward_stop_signals(proc.send_signal) as stop:
            out = stream_lines(proc.stdout, log)
            proc.wait()
        if stop.signum:  # this process was asked to stop and passed it on: not a failure to retry
            raise StageStoppedBySignal(stage, stop.signum, proc.returncode)
        if proc.returncode < 0:
            raise StageInterrupted(f"stage '{stage}' was killed by signal {-proc.returncode}")
        if proc.returncode != 0:
            raise out.failure(stage, proc.returncode)


def _docker_runner(
    image: str | None = None, gpus: str = "none", mounts=(), env: dict | None = None, network: str | None = None
) -> StageRunner:
    from flows.docker_runner import DockerRunner  # the Docker SDK is only imported when containers are asked for

    return DockerRunner(image, gpus, mounts, env, network)


RUNNERS: dict[str, Callable[..., StageRunner]] = {"local": LocalRunner, "docker": _docker_runner}


def get_runner(name: str, options: dict | None = None) -> StageRunner:
    if name not in RUNNERS:
        raise NlsflowError(f"unknown runner {name!r}; choose from {sorted(RUNNERS)}")
    factory = RUNNERS[name]
    try:
        inspect.signature(factory).bind(**(options or {}))
    except TypeError as e:
        raise NlsflowError(f"runner {name!r} does not take these options: {sorted(options or {})} ({e})") from None
    return factory(**(options or {}))
