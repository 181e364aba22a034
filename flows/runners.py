"""Runners start one stage command somewhere: a local subprocess now; a container runner plugs in the same way."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Callable, Protocol

from schemas import NlsflowError

REPO_ROOT = Path(__file__).resolve().parent.parent


def stage_command(stage: str, config_file: Path, force: bool) -> list[str]:
    """The one command every runner executes (also the container entrypoint's arguments)."""
    return ["-m", f"stages.{stage}", "--config", str(config_file), *(["--force"] if force else [])]


class StageInterrupted(RuntimeError):
    """The stage's process was killed (a signal, the OOM killer) or its engine failed: worth a retry."""


class StageRunner(Protocol):
    name: str

    def run(self, stage: str, config_file: Path, log: Callable[[str], None], force: bool = False) -> None:
        """Run the stage to completion, streaming its output lines to `log`.

        Raise NlsflowError when the stage failed (it says why), StageInterrupted when it was killed.
        """


class LocalRunner:
    """`python -m stages.<name>` as a subprocess of this interpreter, in the repository root."""

    name = "local"

    def run(self, stage: str, config_file: Path, log: Callable[[str], None], force: bool = False) -> None:
        env = {**os.environ, "TQDM_MININTERVAL": os.environ.get("TQDM_MININTERVAL", "5"), "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen([sys.executable, *stage_command(stage, Path(config_file).resolve(), force)], cwd=REPO_ROOT,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        tail: deque[str] = deque(maxlen=30)
        for raw in proc.stdout:
            for line in re.split(r"[\r\n]+", raw):
                if line.strip():
                    tail.append(line)
                    log(line)
        if proc.wait() < 0:
            raise StageInterrupted(f"stage '{stage}' was killed by signal {-proc.returncode}")
        if proc.returncode != 0:
            errors = [l for l in tail if l.startswith("error:")] or list(tail)[-1:] or ["no output"]
            raise NlsflowError(f"stage '{stage}' failed (exit {proc.returncode}): {errors[-1].removeprefix('error: ')}")


RUNNERS: dict[str, type] = {"local": LocalRunner}


def get_runner(name: str) -> StageRunner:
    if name not in RUNNERS:
        raise NlsflowError(f"unknown runner {name!r}; choose from {sorted(RUNNERS)}")
    return RUNNERS[name]()
