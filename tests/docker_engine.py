"""A Docker engine for the container tests: the one DOCKER_HOST (or the default socket) names, else a private
`dockerd` started here (Debian's docker.io, as root) on its own socket and data root, stopped by its pid afterwards.
With no registry, the stage images are the `mounted` flavor on a root file system made with debootstrap."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

ROOT_IMAGE = "nlsflow-root:bookworm"


class NoEngine(Exception):
    """Why no engine (or no image) could be had: the tests skip with this reason."""


def _ping(host: str | None) -> bool:
    import docker

    try:
        client = docker.DockerClient(base_url=host) if host else docker.from_env()
        return bool(client.ping())
    except Exception:
        return False


@contextmanager
def docker_engine(scratch: Path):
    """Yield a DOCKER_HOST URL that answers; a daemon started here is stopped (by pid) on exit."""
    given = os.environ.get("DOCKER_HOST")
    if _ping(given):
        yield given or "unix:///var/run/docker.sock"
        return
    if not shutil.which("dockerd"):
        raise NoEngine("no Docker engine answers and dockerd is not installed (apt-get install docker.io)")
    if os.geteuid() != 0:
        raise NoEngine("no Docker engine answers and starting dockerd needs root")
    scratch.mkdir(parents=True, exist_ok=True)
    host = f"unix://{scratch}/docker.sock"
    log = open(scratch / "dockerd.log", "w")
    daemon = subprocess.Popen(
        [
            "dockerd",
            "--bridge=none",
            "--iptables=false",
            "--ip-masq=false",
            "--data-root",
            str(scratch / "data"),
            "--exec-root",
            str(scratch / "exec"),
            "--pidfile",
            str(scratch / "dockerd.pid"),
            "-H",
            host,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not _ping(host):
            if daemon.poll() is not None or time.monotonic() > deadline:
                tail = (scratch / "dockerd.log").read_text().strip().splitlines()[-1:] or ["no output"]
                raise NoEngine(f"dockerd did not start: {tail[0][:200]}")
            time.sleep(0.5)
        yield host
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        log.close()
        shutil.rmtree(scratch, ignore_errors=True)


def root_image(client, scratch: Path) -> str:
    """A minimal Debian root (this host's release) imported as ROOT_IMAGE, unless the engine has it already."""
    if client.images.list(name=ROOT_IMAGE):
        return ROOT_IMAGE
    if not shutil.which("debootstrap"):
        raise NoEngine(f"no {ROOT_IMAGE} image and debootstrap is not installed (apt-get install debootstrap)")
    release = dict(l.split("=", 1) for l in Path("/etc/os-release").read_text().split() if "=" in l)
    suite = release.get("VERSION_CODENAME", "bookworm").strip('"')
    rootfs = scratch / "rootfs"
    # The interpreter is mounted from the host, so the root needs only the shared libraries CPython links against.
    done = subprocess.run(
        [
            "debootstrap",
            "--variant=minbase",
            "--include=libssl3,libffi8,libsqlite3-0,libbz2-1.0",
            suite,
            str(rootfs),
            "http://deb.debian.org/debian",
        ],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise NoEngine(f"debootstrap {suite} failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
    archive = scratch / "rootfs.tar"
    subprocess.run(["tar", "-C", str(rootfs), "-cf", str(archive), "."], check=True)
    repository, tag = ROOT_IMAGE.split(":")
    client.api.import_image_from_file(str(archive), repository=repository, tag=tag)
    shutil.rmtree(rootfs, ignore_errors=True)
    archive.unlink()
    return ROOT_IMAGE
