"""Runners start one stage somewhere and stream its output: a local subprocess (the default), or a container."""
from __future__ import annotations

import codecs
import inspect
import os
import re
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Callable, Iterable, Protocol

from schemas import NlsflowError

REPO_ROOT = Path(__file__).resolve().parent.parent


def stage_args(config_file: Path, force: bool) -> list[str]:
    """A stage's arguments: what a stage image's entrypoint (`python -m stages.<name>`) is given."""
    return ["--config", str(config_file), *(["--force"] if force else [])]


def stage_command(stage: str, config_file: Path, force: bool) -> list[str]:
    """The interpreter arguments that run a stage in this checkout."""
    return ["-m", f"stages.{stage}", *stage_args(config_file, force)]


class StageInterrupted(RuntimeError):
    """The stage's process was killed (a signal, the OOM killer) or its engine failed: worth a retry."""


class StageRunner(Protocol):
    name: str

    def run(self, stage: str, config_file: Path, log: Callable[[str], None], force: bool = False) -> None:
        """Run the stage to completion, streaming its output lines to `log`.

        Raise NlsflowError when the stage failed (it says why), StageInterrupted when it was killed.
        """


class OutputLines:
    """Splits a stage's output into lines (tqdm's carriage-return updates too), logs each and keeps the last few."""

    def __init__(self, log: Callable[[str], None]):
        self.log, self.tail, self.pending = log, deque(maxlen=30), ""
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, chunk: str | bytes) -> None:
        text = self.decoder.decode(chunk) if isinstance(chunk, bytes) else chunk
        *lines, self.pending = re.split(r"[\r\n]", self.pending + text)
        for line in lines:
            if line.strip():
                self.tail.append(line)
                self.log(line)

    def close(self) -> None:
        self.feed(self.decoder.decode(b"", final=True) + "\n")

    def failure(self, stage: str, exit_code: int) -> NlsflowError:
        """The stage's own `error:` line (its one-line reason), else its last line."""
        errors = [l for l in self.tail if l.startswith("error:")] or list(self.tail)[-1:] or ["no output"]
        return NlsflowError(f"stage '{stage}' failed (exit {exit_code}): {errors[-1].removeprefix('error: ')}")


def stream_lines(chunks: Iterable[str | bytes], log: Callable[[str], None]) -> OutputLines:
    out = OutputLines(log)
    for chunk in chunks:
        out.feed(chunk)
    out.close()
    return out


# PEFT writes adapter_config.json's target_modules from a set: a fixed hash seed makes it byte-identical run to run.
STAGE_ENV = {"PYTHONUNBUFFERED": "1", "PYTHONHASHSEED": "0", "TQDM_MININTERVAL": "5"}


class LocalRunner:
    """`python -m stages.<name>` as a subprocess of this interpreter, in the repository root."""

    name = "local"

    def run(self, stage: str, config_file: Path, log: Callable[[str], None], force: bool = False) -> None:
        env = STAGE_ENV | dict(os.environ)
        proc = subprocess.Popen([sys.executable, *stage_command(stage, Path(config_file).resolve(), force)], cwd=REPO_ROOT,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        out = stream_lines(proc.stdout, log)
        if proc.wait() < 0:
            raise StageInterrupted(f"stage '{stage}' was killed by signal {-proc.returncode}")
        if proc.returncode != 0:
            raise out.failure(stage, proc.returncode)


def _docker_runner(image: str | None = None, gpus: str = "none", mounts=(), env: dict | None = None,
                   network: str | None = None) -> StageRunner:
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
