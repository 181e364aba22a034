"""What every runner shares: a stage's command line, its environment, and its output streamed as lines."""

from __future__ import annotations

import codecs
import re
import signal
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

from nlsflow.errors import NlsflowError

REPO_ROOT = Path(__file__).resolve().parent.parent


def stage_args(config_file: Path, force: bool) -> list[str]:
    """A stage's arguments: what a stage image's entrypoint (`python -m stages.<name>`) is given."""
    return ["--config", str(config_file), *(["--force"] if force else [])]


def stage_command(stage: str, config_file: Path, force: bool) -> list[str]:
    """The interpreter arguments that run a stage in this checkout."""
    return ["-m", f"stages.{stage}", *stage_args(config_file, force)]


class StageInterrupted(RuntimeError):
    """The stage's process was killed (a signal, the OOM killer) or its engine failed: worth a retry."""


class StageStoppedBySignal(NlsflowError):
    """The flow was asked to stop (SIGINT, SIGTERM) while a stage ran, and passed the signal on: never retried."""

    def __init__(self, stage: str, signum: int, exit_code: int):
        self.stage, self.signum, self.exit_code = stage, signum, exit_code
        super().__init__(_stopped_message(stage, signum, exit_code))

    def __reduce__(self):
        return type(self), (self.stage, self.signum, self.exit_code)


def _stopped_message(stage: str, signum: int, exit_code: int) -> str:
    name = signal.Signals(signum).name
    if exit_code == 0:  # the stage had just finished: its output stands
        return f"stopped by {name} after '{stage}' finished; re-run the same command to resume"
    if exit_code < 0:  # it died of the signal before it could catch it (a local process)
        how = f"the stage was killed by {signal.Signals(-exit_code).name}"
    elif exit_code == 128 + signum:
        how = "the stage stopped cleanly"
    else:
        how = f"the stage exited with code {exit_code}"
    return f"stopped by {name} during '{stage}' ({how}); re-run the same command to resume from '{stage}'"


class StageRunner(Protocol):
    name: str

    def run(self, stage: str, config_file: Path, log: Callable[[str], None], force: bool = False) -> None:
        """Run the stage to completion, streaming its output lines to `log`.

        Raise NlsflowError when the stage failed (it says why), StageInterrupted when it was killed, and
        StageStoppedBySignal when this process was asked to stop and passed the signal on (flows.signals).
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
