"""Ctrl-C and SIGTERM, for real: a stage stops cleanly with one line; the pipeline passes the signal to the running
stage, keeps its embedded Prefect server out of a terminal's Ctrl-C, and exits within seconds with one line saying
how to resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import REPO, needs_data, tiny_overrides

from flows.stage_process import StageInterrupted, StageStoppedBySignal
from nlsflow.errors import NlsflowError
from nlsflow.layers import config_files

LONG_TRAINING = ("train.epochs=1000", "train.max_steps=100000")  # still training when the signal comes
CONFIG_ARGS = [arg for path in config_files("math", "tiny", "lora") for arg in ("--config", str(path))]


def _wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None or time.monotonic() > deadline:
            status = f"exited {proc.returncode}" if proc.returncode is not None else f"timed out after {timeout:.0f}s"
            raise AssertionError(f"{status} waiting for {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def _training_started(log: Path) -> bool:
    return "train:   0%|" in log.read_text(errors="replace")  # tqdm's first bar: the loop has begun


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def _kill_group(pgid: int) -> None:
    """Kill whatever is left of a process group: a failed test leaves no process behind."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _group_is_gone(pgid: int, within: float = 10) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


# ---- the pieces ---------------------------------------------------------------------------------------------------

STOPPABLE = textwrap.dedent(
    """
    import os, signal, sys, time
    from nlsflow.interrupts import StageStopped, install_stop_handlers, stop_requested
    install_stop_handlers()
    try:
        print("ready", flush=True)
        while True:
            sum(range(10_000))  # busy in Python, as a training step is between tensor ops
    except StageStopped as e:
        os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C during cleanup is ignored
        time.sleep(0.5)
        print(f"cleaned up after {e.signal_name}", stop_requested() == e.signum, isinstance(e, KeyboardInterrupt))
        sys.exit(e.exit_code)
    """
)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_stop_handlers_raise_once_and_shield_cleanup(sig):
    proc = subprocess.Popen(
        [sys.executable, "-c", STOPPABLE], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=10)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 128 + sig, out
    assert out.strip() == f"cleaned up after {signal.Signals(sig).name} True True"


FORWARDING = """
import os, signal, threading
from flows.signals import forward_stop_signals
before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
sent = []
with forward_stop_signals(sent.append) as stop:
    os.kill(os.getpid(), signal.SIGTERM)  # handled before the next line runs
    os.kill(os.getpid(), signal.SIGINT)
assert sent == [signal.SIGTERM, signal.SIGINT] and stop.signum == signal.SIGTERM, sent
assert {s: signal.getsignal(s) for s in before} == before
results = []
def off_main_thread():
    with forward_stop_signals(sent.append) as other:
        results.append(other.signum)
thread = threading.Thread(target=off_main_thread)
thread.start()
thread.join()
assert results == [None] and {s: signal.getsignal(s) for s in before} == before
print("ok")
"""


def test_forwarding_records_the_signal_and_restores_the_handlers():
    # in a fresh interpreter: a test process that loaded OpenVINO (math_run) may crash on a signal sent to itself
    proc = subprocess.run([sys.executable, "-c", FORWARDING], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_a_stop_is_one_line_and_never_retried():
    """The pipeline retries StageInterrupted only; a forwarded stop is an NlsflowError, whatever the exit code."""
    for code in (130, -2, 2, 0):
        e = StageStoppedBySignal("train", signal.SIGINT, code)
        assert isinstance(e, NlsflowError) and not isinstance(e, StageInterrupted)
        assert "\n" not in str(e) and str(e).startswith("stopped by SIGINT") and "re-run the same command" in str(e)
    assert str(StageStoppedBySignal("train", signal.SIGINT, 130)) == (
        "stopped by SIGINT during 'train' (the stage stopped cleanly); re-run the same command to resume from 'train'"
    )
    assert "(the stage was killed by SIGTERM)" in str(StageStoppedBySignal("train", signal.SIGTERM, -15))


SHIELDED_SERVER = textwrap.dedent(
    """
    import json, os, re, signal
    from prefect.client.orchestration import get_client
    from prefect.server.api.server import SubprocessASGIServer
    from flows.signals import start_ephemeral_server_shielded

    start_ephemeral_server_shielded()
    server = SubprocessASGIServer()
    status = open(f"/proc/{server.server_process.pid}/status").read()
    with get_client(sync_client=True) as client:
        client.hello()
        api = str(client.api_url).rstrip("/")
    children = open(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read().split()
    print(json.dumps({
        "server_blocks_sigint": bool(int(re.search(r"SigBlk:\\s*(\\w+)", status)[1], 16) & 1 << (signal.SIGINT - 1)),
        "mask_here": sorted(signal.pthread_sigmask(signal.SIG_BLOCK, [])),
        "same_server": api == server.api_url.rstrip("/"),
        "children": len(children),
    }))
    """
)


def test_the_embedded_server_is_shielded_from_ctrl_c_and_reused():
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    done = subprocess.run(
        [sys.executable, "-c", SHIELDED_SERVER], cwd=REPO, env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.splitlines()[-1])
    assert seen == {"server_blocks_sigint": True, "mask_here": [], "same_server": True, "children": 1}


# ---- a stage and the pipeline ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pruned(tmp_path_factory) -> Path:
    """A run folder whose prune stage is done (lora method, tiny profile): the tests copy it and go on to train."""
    run_dir = tmp_path_factory.mktemp("pruned") / "run"
    done = subprocess.run(
        [sys.executable, "-m", "stages.prune", *CONFIG_ARGS, *tiny_overrides(run_dir, *LONG_TRAINING)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def _copy(pruned: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(pruned, run_dir)
    return run_dir


# Exit 143, the one line and the removed temp folder need stages/_common.py main to call
# nlsflow.interrupts.install_stop_handlers() and catch StageStopped; without that SIGTERM kills the stage (-15).
@needs_data
def test_a_stage_stops_cleanly_on_sigterm(pruned, tmp_path):
    run_dir = _copy(pruned, tmp_path)
    log = tmp_path / "train.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "stages.train", *CONFIG_ARGS, *tiny_overrides(run_dir, *LONG_TRAINING)],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_for(lambda: _training_started(log), 240, "training to start", proc, log)
        assert list(run_dir.glob(".train.*.tmp")), "the stage's temp folder should exist while it trains"
        proc.send_signal(signal.SIGTERM)
        start = time.monotonic()
        code = proc.wait(timeout=30)
        took = time.monotonic() - start
    finally:
        _kill_group(proc.pid)
    text = log.read_text()
    assert code == 128 + signal.SIGTERM, text[-3000:]
    assert took < 10, f"took {took:.1f}s to stop"
    errors = _error_lines(text)
    assert len(errors) == 1 and "stopped by SIGTERM" in errors[0] and "re-run" in errors[0], errors
    assert "Traceback" not in text
    assert not list(run_dir.glob(".train.*.tmp")) and not (run_dir / "train").exists()


def _stop_the_pipeline(pruned: Path, tmp_path: Path, sig: int, whole_group: bool) -> None:
    """Run the pipeline until training has started, send `sig` (to the group, as a terminal's Ctrl-C does, or to
    the pipeline alone), and check it stops within seconds with one line and leaves no process behind."""
    run_dir = _copy(pruned, tmp_path)
    out_log, err_log = tmp_path / "pipeline.out", tmp_path / "pipeline.err"
    command = [sys.executable, "-m", "flows.pipeline", *CONFIG_ARGS, *tiny_overrides(run_dir, *LONG_TRAINING)]
    with open(out_log, "w") as out, open(err_log, "w") as err:
        proc = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=err, start_new_session=True)
    pgid = proc.pid
    try:
        _wait_for(lambda: _training_started(err_log), 300, "training to start", proc, err_log)  # Prefect logs there
        assert (run_dir / "prune" / "manifest.json").is_file()
        os.killpg(pgid, sig) if whole_group else proc.send_signal(sig)
        start = time.monotonic()
        code = proc.wait(timeout=60)
        took = time.monotonic() - start
        assert _group_is_gone(pgid), "a process of the pipeline's group outlived it"
    finally:
        _kill_group(pgid)
    stderr = err_log.read_text()
    assert code == 128 + sig, (out_log.read_text() + stderr)[-4000:]
    assert took < 20, f"took {took:.1f}s to stop"
    errors = _error_lines(stderr)
    name = signal.Signals(sig).name
    assert len(errors) == 1 and f"stopped by {name} during 'train'" in errors[0] and "re-run" in errors[0], errors
    assert "ConnectError" not in stderr + out_log.read_text()
    assert not list(run_dir.glob(".train.*.tmp")) and not (run_dir / "train").exists()


# These need flows/pipeline.py main to call flows.signals.start_ephemeral_server_shielded() before the flow (else
# Ctrl-C kills the embedded server and the flow hangs on ConnectError) and to exit 128 + flows.signals.stop_signal().
@needs_data
def test_ctrl_c_stops_the_pipeline_within_seconds(pruned, tmp_path):
    _stop_the_pipeline(pruned, tmp_path, signal.SIGINT, whole_group=True)


@needs_data
def test_sigterm_stops_the_pipeline_within_seconds(pruned, tmp_path):
    _stop_the_pipeline(pruned, tmp_path, signal.SIGTERM, whole_group=False)
