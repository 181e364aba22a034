"""A run folder belongs to one run at a time, keeps what is not nlsflow's, and holds results that belong together."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, TINY_CONFIGS, tiny_config, tiny_overrides

from nlsflow.artifacts import read_manifest, rerun_reason, stage_dir
from nlsflow.config import RUN_CONFIG_HEADER, write_run_config
from nlsflow.errors import NlsflowError
from nlsflow.runlock import HOLDER_NAME, run_lock
from stages import prune
from stages._common import main, run_stage


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=_env()
    )


def _env() -> dict:
    env = dict(os.environ)
    env.pop("NLSFLOW_RUN_LOCK", None)
    return env


def _one_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


def _copy_run(math_run, dest):
    """A finished tiny run in `dest`, with the run config the pipeline writes there."""
    shutil.copytree(math_run.run_dir, dest)
    cfg = math_run.model_copy(update={"run_dir": str(dest)})
    return cfg, write_run_config(cfg)


def _digests(folder) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- one run at a time -------------------------------------------------------------------------------------------

HOLD = """
import sys, time
from nlsflow.runlock import run_lock
with run_lock(sys.argv[1], "a test holding the folder"):
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def held_folder(tmp_path):
    """A run folder held by another process; yields (folder, process). The process is killed at the end."""
    folder = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)], cwd=REPO, stdout=subprocess.PIPE, text=True, env=_env()
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        yield folder, holder
    finally:
        holder.kill()
        holder.wait()


def test_a_second_run_is_refused_naming_the_holder_and_touches_nothing(held_folder):
    folder, holder = held_folder
    before = sorted(p.name for p in folder.iterdir())
    proc = _run("-m", "stages.prune", *[a for p in TINY_CONFIGS for a in ("--config", str(p))], *tiny_overrides(folder))
    line = _one_error(proc)
    assert f"pid {holder.pid}" in line and "a test holding the folder" in line and "wait for that run" in line
    assert sorted(p.name for p in folder.iterdir()) == before  # no prune/, no temp folder


def test_the_pipeline_is_refused_before_its_server_starts(held_folder):
    folder, holder = held_folder
    proc = _run(
        "-m", "flows.pipeline", "--task", "math", "--profile", "tiny", "--method", "lora", *tiny_overrides(folder)
    )
    assert f"pid {holder.pid}" in _one_error(proc)
    assert "temporary server" not in proc.stderr + proc.stdout


def test_a_lock_dies_with_its_holder_even_by_sigkill(held_folder):
    folder, holder = held_folder
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with run_lock(folder, "the next run"):  # no stale lock to clear by hand
        assert json.loads((folder / HOLDER_NAME).read_text())["command"] == "the next run"


def test_a_stage_under_its_pipeline_shares_the_lock_and_others_do_not(tmp_path, monkeypatch):
    with run_lock(tmp_path, "pipeline"):
        token = os.environ["NLSFLOW_RUN_LOCK"]
        child = "from nlsflow.runlock import run_lock\nwith run_lock(__import__('sys').argv[1], 'stage'): print('ok')"
        env = {**_env(), "NLSFLOW_RUN_LOCK": token}
        shared = subprocess.run([sys.executable, "-c", child, str(tmp_path)], cwd=REPO, env=env, capture_output=True)
        assert shared.stdout.strip() == b"ok", shared.stderr
        other = subprocess.run([sys.executable, "-c", child, str(tmp_path)], cwd=REPO, env=_env(), capture_output=True)
        assert other.returncode != 0 and b"is in use by pid" in other.stderr
    assert "NLSFLOW_RUN_LOCK" not in os.environ


# --- nothing of the user's is lost ---------------------------------------------------------------------------------


@pytest.mark.parametrize("stage, name", [("train", "mydata.jsonl"), ("benchmark", "notes.md")])
def test_a_stage_folder_holding_a_users_file_is_refused_and_kept(math_run, tmp_path, stage, name):
    cfg, config = _copy_run(math_run, tmp_path / "run")
    (stage_dir(cfg.run_dir, stage) / name).write_text("mine")
    before = _digests(stage_dir(cfg.run_dir, stage))
    line = _one_error(_run("-m", f"stages.{stage}", "--config", str(config), "--force"))
    assert name in line and "did not write" in line and "move them out" in line
    assert _digests(stage_dir(cfg.run_dir, stage)) == before
    (stage_dir(cfg.run_dir, stage) / name).unlink()
    assert rerun_reason(cfg.run_dir, stage, cfg) is None  # the stage's own files are intact


def test_a_stage_folder_without_a_readable_manifest_is_not_replaced(tmp_path):
    folder = stage_dir(tmp_path, "prune")
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text("{ cut")
    (folder / "weights.bin").write_bytes(b"?")
    with pytest.raises(NlsflowError, match="cannot tell its own files from yours; move or delete"):
        run_stage("prune", prune.run, tiny_config(tmp_path))
    assert (folder / "weights.bin").read_bytes() == b"?"


def test_a_users_config_yaml_in_the_run_folder_is_refused_and_kept(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("# my notes\ntask: math\n")
    proc = _run("-m", "flows.pipeline", "--task", "math", "--profile", "tiny", "--method", "lora", *tiny_overrides(run))
    assert "is not a run config nlsflow wrote" in _one_error(proc)
    assert (run / "config.yaml").read_text() == "# my notes\ntask: math\n"
    assert "temporary server" not in proc.stderr + proc.stdout


# --- inputs that belong together -----------------------------------------------------------------------------------


def test_a_stage_alone_refuses_inputs_made_with_other_settings_or_from_another_run(math_run, tmp_path):
    cfg, config = _copy_run(math_run, tmp_path / "run")
    proc = _run("-m", "stages.prune", "--config", str(config), "prune.sparsity=0.6")
    assert proc.returncode == 0, proc.stderr[-2000:]
    extract_before = _digests(stage_dir(cfg.run_dir, "extract"))

    line = _one_error(_run("-m", "stages.extract", "--config", str(config), "--force"))
    assert "prune was made with other settings than this config (prune.sparsity: 0.6 -> 0.5)" in line
    assert "re-run the 'prune' stage" in line

    line = _one_error(_run("-m", "stages.extract", "--config", str(config), "--force", "prune.sparsity=0.6"))
    assert "train was made from an earlier 'prune' result" in line and "re-run 'train'" in line
    assert _digests(stage_dir(cfg.run_dir, "extract")) == extract_before


def test_a_copied_run_works_in_the_copy_and_says_so(math_run, tmp_path):
    cfg, _ = _copy_run(math_run, tmp_path / "original")
    copy = tmp_path / "copy"
    shutil.copytree(cfg.run_dir, copy)
    original = _digests(stage_dir(cfg.run_dir, "evaluate"))
    proc = _run("-m", "stages.evaluate", "--config", str(copy / "config.yaml"), "--force")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"run folder: {copy}" in proc.stderr and "a copied run" in proc.stderr
    assert _digests(stage_dir(cfg.run_dir, "evaluate")) == original
    assert (
        read_manifest(copy / "evaluate", "evaluate").created_at
        > read_manifest(stage_dir(cfg.run_dir, "evaluate"), "evaluate").created_at
    )


# --- bad input: one line, and a re-run says why it runs ------------------------------------------------------------


def test_a_config_mistake_on_the_command_line_is_one_line_naming_it_before_any_server(tmp_path):
    proc = _run(
        "-m", "flows.pipeline", "--task", "math", "--profile", "tiny", *tiny_overrides(tmp_path, "prune.sparsity=2")
    )
    line = _one_error(proc)
    assert "config error in the command line (prune.sparsity=2)" in line
    assert "temporary server" not in proc.stderr + proc.stdout


def test_a_read_only_run_folder_is_read_when_nothing_needs_writing(math_run, tmp_path, monkeypatch):
    cfg, _ = _copy_run(math_run, tmp_path / "run")
    monkeypatch.setattr("nlsflow.runlock._writable", lambda path: False)  # root ignores chmod: say it is read-only
    assert run_stage("prune", prune.run, cfg) is None
    with pytest.raises(NlsflowError, match=r"is read-only, and 'prune' needs to run \(--force\); make it writable"):
        run_stage("prune", prune.run, cfg, force=True)


def test_a_full_disk_is_one_line_and_the_previous_result_is_kept(math_run, tmp_path, capsys):
    cfg, config = _copy_run(math_run, tmp_path / "run")
    before = _digests(stage_dir(cfg.run_dir, "prune"))

    def disk_full(ctx):
        raise OSError(28, "No space left on device", str(ctx.out_dir / "model.safetensors"))

    assert main("prune", disk_full, ["--config", str(config), "--force"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err
    assert "error: prune: no space left writing" in lines[0] and "free space there and re-run" in lines[0]
    assert _digests(stage_dir(cfg.run_dir, "prune")) == before
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]


def test_a_rerun_over_a_corrupt_file_says_why(math_run, tmp_path):
    cfg, config = _copy_run(math_run, tmp_path / "run")
    weights = next(stage_dir(cfg.run_dir, "prune").rglob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    proc = _run("-m", "stages.prune", "--config", str(config))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"prune: running ({weights} does not match its sha256" in proc.stderr


def test_artifacts_are_readable_by_group_and_others_as_the_umask_allows(math_run):
    mask = os.umask(0)
    os.umask(mask)
    files = [p for p in (stage_dir(math_run.run_dir, s) for s in ("prune", "train", "extract")) for p in p.rglob("*")]
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert weights
    for path in files:
        mode = path.stat().st_mode & 0o777
        assert mode == (0o777 if path.is_dir() else 0o666) & ~mask, (path, oct(mode))


def test_the_run_config_is_rewritten_only_when_it_changes(tmp_path):
    cfg = tiny_config(tmp_path)
    path = write_run_config(cfg)
    assert path.read_text().startswith(RUN_CONFIG_HEADER)
    stamp = path.stat().st_mtime_ns
    time.sleep(0.01)
    write_run_config(cfg)
    assert path.stat().st_mtime_ns == stamp
