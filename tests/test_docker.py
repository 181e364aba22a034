"""RUNNER=docker: option parsing and the missing-engine error everywhere; with an engine (tests/docker_engine.py),
the whole tiny pipeline in containers through the flow, compared with the in-process run, and the failure paths."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from contextlib import ExitStack
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import MATH_RUN, REPO, TINY_CONFIGS, needs_data, tiny_config, tiny_overrides
from docker_engine import NoEngine, docker_engine, root_image

from flows.docker_runner import LABEL, DockerRunner, device_requests, parse_mount, stage_mounts
from flows.runners import get_runner
from flows.stage_process import StageInterrupted
from nlsflow.artifacts import read_manifest, stage_dir
from nlsflow.config import write_run_config
from nlsflow.errors import NlsflowError
from nlsflow.runlock import run_lock
from schemas import STAGES

# timings and what is made of them, not results
MEASURED = {
    "seconds",
    "prefill_ms",
    "decode_ms_per_token",
    "tokens_per_s",
    "peak_memory_mb",
    "prefill_ms_spread",
    "decode_ms_per_token_spread",
    "tokens_per_s_spread",
    "speedup",
    "note",
}
# model cards quote the measured max |Δlogit| and the host's model cache path (tests/test_model_card.py checks them)
MEASURED_FILES = {"results.md", "throughput_vs_macs.png", "accuracy_vs_macs.png", "README.md"}


def test_gpu_requests_follow_docker_run():
    assert device_requests("none") == []
    assert device_requests("all")[0]["Count"] == -1
    assert device_requests("2")[0]["Count"] == 2
    assert device_requests("device=0,3")[0]["DeviceIDs"] == ["0", "3"]
    for bad in ("0", "some", "device=", "-1"):
        with pytest.raises(NlsflowError, match="GPUS|gpus=.*all, a count"):
            device_requests(bad)


def test_mount_specs():
    assert parse_mount("/srv/data:ro") == {
        "Target": "/srv/data",
        "Source": "/srv/data",
        "Type": "bind",
        "ReadOnly": True,
    }
    assert parse_mount("/srv/runs:/runs")["Target"] == "/runs"
    assert parse_mount("nlsflow-artifacts:/runs")["Type"] == "volume"
    for bad in ("relative/path", "vol", "/a:/b:/c", ":/x"):
        with pytest.raises(NlsflowError, match="is not /host/path"):
            parse_mount(bad)


def test_unknown_runner_options_are_one_line():
    with pytest.raises(NlsflowError, match="does not take these options"):
        get_runner("local", {"gpus": "all"})
    with pytest.raises(NlsflowError, match="unknown runner 'k8s'"):
        get_runner("k8s")


@needs_data
def test_stage_mounts_cover_what_a_stage_touches(tmp_path):
    cfg = tiny_config(tmp_path / "run")
    config_file = write_run_config(cfg)
    mounts = {m["Target"]: m["ReadOnly"] for m in stage_mounts(config_file, cfg)}
    assert mounts[cfg.run_dir] is False and mounts[os.environ["NLSFLOW_CACHE"]] is False
    assert mounts[cfg.data.root] is False  # data.download may fetch missing files into it
    cfg = tiny_config(tmp_path / "run", "data.download=false")
    assert {m["Target"]: m["ReadOnly"] for m in stage_mounts(config_file, cfg)}[cfg.data.root] is True
    shared = stage_mounts(config_file, cfg, [parse_mount(f"artifacts:{tmp_path}")])  # a volume replaces what it covers
    assert [m["Target"] for m in shared if m["Target"].startswith(str(tmp_path))] == [str(tmp_path)]
    # a worker in a container: the given mounts only, and the run folder, cache and data must lie under them
    with pytest.raises(NlsflowError, match=f"{os.environ['NLSFLOW_CACHE']}.* not under the given mounts"):
        stage_mounts(config_file, cfg, [parse_mount(f"artifacts:{tmp_path}")], only_given=True)
    given = [parse_mount(f"artifacts:{tmp_path}"), parse_mount(f"cache:{os.environ['NLSFLOW_CACHE']}")]
    assert stage_mounts(config_file, cfg, given, only_given=True) == given


@needs_data
def test_missing_engine_names_the_local_runner(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-engine.sock")
    config_file = write_run_config(tiny_config(tmp_path / "run"))
    with pytest.raises(NlsflowError, match="no Docker engine at unix://.*RUNNER=local") as err:
        DockerRunner().run("prune", config_file, print)
    assert "\n" not in str(err.value)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.pipeline",
            "--runner",
            "docker",
            "--task",
            "math",
            *tiny_overrides(tmp_path / "run"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    assert "no Docker engine" in done.stderr and "RUNNER=local" in done.stderr


def test_compose_file_is_valid():
    compose = shutil.which("docker-compose")
    if not compose:
        pytest.skip("docker-compose is not installed (Debian: apt-get install docker-compose)")
    env = {**os.environ, "DATA_ROOT": "/srv/nlsflow/data"}
    done = subprocess.run(
        [compose, "-f", str(REPO / "docker-compose.yml"), "config"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    services = yaml.safe_load(done.stdout)["services"]
    assert {"prefect-server", "worker", *STAGES} <= set(services)
    for stage in STAGES:
        assert services[stage]["image"] == f"nlsflow-{stage}:cuda"
        devices = services[stage]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"] and devices[0]["count"] == "all"
        assert "artifacts:/runs" in json.dumps(services[stage]["volumes"])
    worker = services["worker"]
    assert (
        "/var/run/docker.sock" in json.dumps(worker["volumes"]) and worker["environment"]["NLSFLOW_RUNNER"] == "docker"
    )
    assert worker["environment"]["NLSFLOW_DOCKER_MOUNTS"] == "nlsflow-artifacts:/runs,/srv/nlsflow/data:/data:ro"
    env.pop("DATA_ROOT")
    done = subprocess.run(
        [compose, "-f", str(REPO / "docker-compose.yml"), "config"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode != 0 and "set DATA_ROOT" in done.stderr


# ---- with an engine ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine():
    """DOCKER_HOST pointing at an engine that has the `mounted` stage images; options for the runner."""
    from flows.images import build_images, interpreter_prefix

    scratch = Path(tempfile.mkdtemp(prefix="nlsflow-engine-"))  # short: a unix socket path has ~100 characters
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, scratch, ignore_errors=True)
        stack.callback(_restore_env, "DOCKER_HOST", os.environ.get("DOCKER_HOST"))
        try:
            os.environ["DOCKER_HOST"] = host = stack.enter_context(docker_engine(scratch / "engine"))
            import docker

            client = docker.DockerClient(base_url=host)
            build_images("mounted", base=root_image(client, scratch), log=lambda line: None)
        except NoEngine as e:
            pytest.skip(f"no Docker engine for the container tests: {e}")
        yield client, {"image": "nlsflow-{stage}:mounted", "mounts": [f"{REPO}:ro", f"{interpreter_prefix()}:ro"]}


def _restore_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def _leftover_containers(client) -> list:
    return client.containers.list(all=True, filters={"label": LABEL})


def _config_file(run_dir: Path) -> Path:
    return write_run_config(tiny_config(run_dir))


def _same_content(a: Path, b: Path, a_root: str, b_root: str) -> bool:
    """Equal apart from the run folder's path, the order of target_modules, measured timings and OpenVINO's
    generated node names (numbered by a per-process counter)."""
    if a.name in MEASURED_FILES:
        return True
    if a.suffix == ".parquet":
        ta, tb = pq.read_table(a), pq.read_table(b)
        keep = [c for c in ta.column_names if c not in MEASURED]
        return ta.column_names == tb.column_names and ta.select(keep).equals(tb.select(keep))
    text_a, text_b = a.read_text().replace(a_root, "<run>"), b.read_text().replace(b_root, "<run>")
    if a.name == "adapter_config.json":  # PEFT writes target_modules from a set: its order follows the hash seed
        doc_a, doc_b = json.loads(text_a), json.loads(text_b)
        return doc_a | {"target_modules": sorted(doc_a["target_modules"])} == doc_b | {
            "target_modules": sorted(doc_b["target_modules"])
        }
    if a.name == "openvino_model.xml":
        text_a, text_b = (re.sub(r'(name="[^"]*?)_?\d+"', r'\1"', text) for text in (text_a, text_b))
    return text_a == text_b


@pytest.mark.slow
@needs_data
def test_pipeline_in_containers_matches_the_local_run(engine, math_run, tmp_path):
    from flows.pipeline import pipeline

    client, options = engine
    run_dir = tmp_path / "in-containers"
    state = pipeline(
        [str(p) for p in TINY_CONFIGS],
        tiny_overrides(run_dir, *MATH_RUN),
        "docker",
        runner_options=options,
        return_state=True,
    )
    assert state.is_completed(), state.message
    assert [r["status"] for r in state.result()] == ["ran"] * len(STAGES)
    assert _leftover_containers(client) == []
    for stage in STAGES:
        ours, local = (read_manifest(stage_dir(d, stage), stage) for d in (run_dir, math_run.run_dir))
        assert ours.config == local.config and ours.inputs.keys() == local.inputs.keys()
        assert [o.path for o in ours.outputs] == [o.path for o in local.outputs], stage
        for o, l in zip(ours.outputs, local.outputs):
            if o.sha256 != l.sha256:  # only measured timings or the run folder's path may differ
                assert _same_content(
                    stage_dir(run_dir, stage) / o.path,
                    stage_dir(math_run.run_dir, stage) / l.path,
                    str(run_dir),
                    str(math_run.run_dir),
                ), f"{stage}/{o.path}"
        weights = [(o.sha256, l.sha256) for o, l in zip(ours.outputs, local.outputs) if o.path.endswith(".safetensors")]
        assert all(a == b for a, b in weights), stage  # weights: bit for bit
    assert any(o.path.endswith(".safetensors") for o in read_manifest(stage_dir(run_dir, "train"), "train").outputs)


@pytest.mark.slow
@needs_data
def test_stage_output_streams_and_errors_are_the_stage_s(engine, tmp_path):
    client, options = engine
    lines = []
    with pytest.raises(NlsflowError, match=r"stage 'evaluate' failed \(exit 2\): .*run the 'prune' stage first") as err:
        DockerRunner(**options).run("evaluate", _config_file(tmp_path / "run"), lines.append)
    assert "\n" not in str(err.value) and any(l.startswith("error:") for l in lines)
    assert _leftover_containers(client) == []


@pytest.mark.slow
@needs_data
def test_a_killed_container_is_interrupted_and_removed(engine, tmp_path):
    client, options = engine

    def kill_on_first_line(line, done=threading.Event()):  # noqa: B008 (one event for the whole run)
        if not done.is_set():
            done.set()
            for c in _leftover_containers(client):
                c.kill()

    with pytest.raises(StageInterrupted, match="killed"):
        DockerRunner(**options).run("prune", _config_file(tmp_path / "run"), kill_on_first_line)
    assert _leftover_containers(client) == []


@pytest.mark.slow
@needs_data
def test_bad_image_or_gpu_request_leaves_no_container(engine, tmp_path):
    client, options = engine
    config_file = _config_file(tmp_path / "run")
    with pytest.raises(
        NlsflowError, match="image nlsflow-prune:absent is not on the engine; build it with `make images`"
    ):
        DockerRunner(**{**options, "image": "nlsflow-{stage}:absent"}).run("prune", config_file, print)
    if "nvidia" in client.info().get("Runtimes", {}):
        pytest.skip("this engine has the NVIDIA runtime: a GPU request would start")
    with pytest.raises(NlsflowError, match="container could not start: .*GPUS=none"):
        DockerRunner(**{**options, "gpus": "all"}).run("prune", config_file, print)
    assert _leftover_containers(client) == []


@pytest.mark.slow
@needs_data
def test_a_container_stage_is_refused_while_the_host_holds_the_run_folder(engine, tmp_path):
    """flock across the bind mount: the container's stage is another run unless it carries the holder's token."""
    client, options = engine
    config_file = _config_file(tmp_path / "run")
    lines = []
    with run_lock(tmp_path / "run", "the host"):
        token = os.environ.pop("NLSFLOW_RUN_LOCK")  # the runner passes NLSFLOW_* on: without it, another run
        try:
            with pytest.raises(NlsflowError, match=r"is in use by pid \d+ on host .*\(the host\)"):
                DockerRunner(**options).run("prune", config_file, lines.append)
        finally:
            os.environ["NLSFLOW_RUN_LOCK"] = token
    assert not (tmp_path / "run" / "prune").exists()
    assert _leftover_containers(client) == []
