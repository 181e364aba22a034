"""RUNNER=docker: each stage in its own container, started through the Docker SDK.

The container runs the stage's image (`nlsflow-<stage>:cpu`, or `:cuda` when GPUs are asked for; `make images`
builds both) with the stage's arguments. The host paths the stage reads or writes are mounted at the same absolute
paths, so the resolved <run_dir>/config.yaml means the same thing inside: the run folder and the model cache
read-write, the data root, a local model folder and a search-space file read-only. The container runs as the
calling user (its files in the run folder stay yours) and is removed whatever happens.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from docker.errors import APIError, DockerException, ImageNotFound
from docker.types import DeviceRequest, Mount
from requests.exceptions import RequestException

import docker
from flows.signals import forward_stop_signals
from flows.stage_process import STAGE_ENV, StageInterrupted, StageStoppedBySignal, stage_args, stream_lines
from nlsflow.config import load_config
from nlsflow.errors import NlsflowError
from nlsflow.models import cache_root
from schemas import PipelineConfig

PASSED_ENV = (
    "NLSFLOW_",
    "HF_",
    "TRANSFORMERS_",
    "TQDM_",
    "OMP_",
    "MKL_",
    "PYTORCH_",
    "PYTHONHASHSEED",
)  # host variables a stage sees
LABEL = "nlsflow.stage"
# /dev/shm of a stage container: NCCL and torch's inter-process tensors live there, and Docker's default 64 MB stalls
# or kills training on several GPUs. A tmpfs limit, not a reservation.
SHM_SIZE = "16g"


def device_requests(gpus: str) -> list[DeviceRequest]:
    """`all`, a count (`2`), device ids (`device=0,3`) or `none`: the `docker run --gpus` vocabulary."""
    gpus = str(gpus).strip()
    if gpus == "none":
        return []
    if gpus == "all":
        return [DeviceRequest(count=-1, capabilities=[["gpu"]])]
    if gpus.isdigit() and int(gpus) > 0:
        return [DeviceRequest(count=int(gpus), capabilities=[["gpu"]])]
    if gpus.startswith("device=") and all(i.strip() for i in gpus.removeprefix("device=").split(",")):
        return [DeviceRequest(device_ids=gpus.removeprefix("device=").split(","), capabilities=[["gpu"]])]
    raise NlsflowError(f"gpus={gpus!r} is not understood; use all, a count such as 2, device=0,1, or none")


def parse_mount(spec: str) -> Mount:
    """`/host/path[:/container/path][:ro]` or `volume-name:/container/path[:ro]`, as `docker run -v` takes them
    (a host path is mounted at the same path unless told otherwise)."""
    parts = spec.strip().split(":")
    read_only = parts[-1] == "ro"
    parts = parts[:-1] if parts[-1] in ("ro", "rw") else parts
    source, target = parts[0], parts[-1]
    if not 1 <= len(parts) <= 2 or not target.startswith("/") or not source:
        raise NlsflowError(f"mount {spec!r} is not /host/path[:/container/path][:ro] or volume:/container/path[:ro]")
    return Mount(target=target, source=source, type="bind" if source.startswith("/") else "volume", read_only=read_only)


def connect() -> docker.DockerClient:
    """The engine DOCKER_HOST names (or the default socket), or a one-line error saying how to do without it."""
    where = os.environ.get("DOCKER_HOST", "the default socket")
    client = None
    try:
        client = docker.from_env()
        client.ping()
    except (DockerException, RequestException) as e:
        if client is not None:
            client.close()
        reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise NlsflowError(
            f"no Docker engine at {where} ({reason}); start one or set DOCKER_HOST, "
            "or run the stages here with RUNNER=local"
        ) from None
    return client


def stage_mounts(
    config_file: Path, cfg: PipelineConfig, given: Sequence[Mount] = (), only_given: bool = False
) -> list[Mount]:
    """The host paths a stage of this config reads (read-only) or writes, at the same paths in the container,
    then the `given` mounts, which replace those under their targets (a shared volume at /runs, say).

    `only_given` (a worker that runs in a container itself, whose paths mean nothing to the host): mount nothing
    but the given mounts, and refuse a run folder or cache outside them; other paths must be in the image.
    """
    writable = {Path(cfg.run_dir), cache_root(cfg.model.cache_dir)}
    readable = {Path(config_file).resolve().parent}
    (writable if cfg.data.download else readable).add(Path(cfg.data.root))  # missing files are fetched into it
    for path in (cfg.model.name_or_path, cfg.train.search_space_file):
        if path and Path(path).is_absolute() and Path(path).exists():
            readable.add(Path(path))
    covered = [Path(m["Target"]) for m in given]
    if only_given:
        if stray := [str(p) for p in sorted(writable) if not any(p.is_relative_to(c) for c in covered)]:
            raise NlsflowError(
                f"{', '.join(stray)} not under the given mounts {[str(c) for c in covered]}: put run_dir, "
                "the model cache and data.root there (NLSFLOW_DOCKER_MOUNTS)"
            )
        return list(given)
    for path in writable:
        path.mkdir(parents=True, exist_ok=True)
    readable = {p for p in readable if p.exists() and not any(p.is_relative_to(w) for w in writable)}
    own = [p for p in sorted(writable | readable) if not any(p.is_relative_to(c) for c in covered)]
    return [Mount(target=str(p), source=str(p), type="bind", read_only=p in readable) for p in own] + list(given)


def _kill_soon(container, sig: int) -> None:
    """Send `sig` to the container from a thread: a signal handler must not re-enter the engine client."""

    def kill() -> None:
        try:
            container.kill(signal=sig)
        except (APIError, RequestException):
            pass  # it has exited already

    threading.Thread(target=kill, name="nlsflow-stop", daemon=True).start()


class DockerRunner:
    """Runs `<image> --config <run_dir>/config.yaml [--force]` in a fresh container per stage attempt.

    `image` defaults to NLSFLOW_IMAGE, else nlsflow-{stage}:cpu (:cuda when GPUs are asked for). `mounts` default
    to NLSFLOW_DOCKER_MOUNTS (comma-separated); with NLSFLOW_DOCKER_ONLY_GIVEN_MOUNTS=1 (a worker inside compose)
    they are the only mounts. `network` is the engine's default unless given.
    """

    name = "docker"

    def __init__(
        self,
        image: str | None = None,
        gpus: str = "none",
        mounts: Sequence[str] = (),
        env: dict[str, str] | None = None,
        network: str | None = None,
    ):
        self.requests = device_requests(gpus)
        self.gpus = gpus
        self.image = (
            image or os.environ.get("NLSFLOW_IMAGE") or f"nlsflow-{{stage}}:{'cuda' if self.requests else 'cpu'}"
        )
        mounts = mounts or [m for m in os.environ.get("NLSFLOW_DOCKER_MOUNTS", "").split(",") if m.strip()]
        self.mounts = [parse_mount(m) for m in mounts]
        self.only_given = os.environ.get("NLSFLOW_DOCKER_ONLY_GIVEN_MOUNTS", "") not in ("", "0", "false")
        self.env = {k: v for k, v in os.environ.items() if k.startswith(PASSED_ENV)} | dict(env or {})
        self.network = network

    def run(self, stage: str, config_file: Path, log: Callable[[str], None], force: bool = False) -> None:
        config_file = Path(config_file).resolve()
        image = self.image.format(stage=stage)
        cfg = load_config([config_file])
        cache = str(cache_root(cfg.model.cache_dir))
        client = connect()
        container, started = None, False
        try:
            container = client.containers.create(
                image,
                stage_args(config_file, force),
                mounts=stage_mounts(config_file, cfg, self.mounts, self.only_given),
                environment=STAGE_ENV | {"HF_HOME": f"{cache}/hf"} | self.env | {"NLSFLOW_CACHE": cache},
                device_requests=self.requests or None,
                user=f"{os.getuid()}:{os.getgid()}",
                network_mode=self.network,
                labels={LABEL: stage, "nlsflow.config": str(config_file)},
                shm_size=SHM_SIZE,
            )
            container.start()
            started = True
            with forward_stop_signals(lambda sig: _kill_soon(container, sig)) as stop:
                out = stream_lines(container.logs(stream=True, follow=True), log)
                code = container.wait().get("StatusCode", -1)
            container.reload()
            oom_killed = container.attrs["State"].get("OOMKilled", False)
        except ImageNotFound:
            raise NlsflowError(
                f"image {image} is not on the engine; build it with `make images` "
                "(FLAVOR=cuda for GPU hosts) or pass --image"
            ) from None
        except APIError as e:
            if started:
                raise StageInterrupted(f"the engine failed while running stage '{stage}': {e.explanation}") from None
            hint = (
                f" (asked for GPUs: {self.gpus}; without the NVIDIA container toolkit use GPUS=none)"
                if self.requests
                else ""
            )
            raise NlsflowError(f"stage '{stage}' container could not start: {e.explanation}{hint}") from None
        except RequestException as e:
            raise StageInterrupted(f"lost the engine while running stage '{stage}': {e}") from None
        finally:
            if container is not None:
                try:
                    container.remove(force=True, v=True)  # with the anonymous volumes an image declares
                except (APIError, RequestException):
                    pass
            client.close()
        if stop.signum:  # this process was asked to stop and passed it on: not a failure to retry
            raise StageStoppedBySignal(stage, stop.signum, code)
        if code > 128 or oom_killed:
            raise StageInterrupted(
                f"stage '{stage}' container was killed (exit {code}{', out of memory' if oom_killed else ''})"
            )
        if code != 0:
            raise out.failure(stage, code)
