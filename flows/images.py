"""`make images`: build the six stage images through the Docker SDK.

python -m flows.images                       nlsflow-<stage>:cpu   from docker/Dockerfile
python -m flows.images --flavor cuda         nlsflow-<stage>:cuda  (CUDA runtime base, torch's CUDA wheel)
python -m flows.images --flavor mounted --base nlsflow-root:bookworm
                                             nlsflow-<stage>:mounted from docker/Dockerfile.mounted: no install,
                                             the checkout and its interpreter are mounted by the runner
"""

from __future__ import annotations

import argparse
import io
import sys
from contextlib import closing
from pathlib import Path

from docker.errors import APIError

from flows.docker_runner import connect
from flows.stage_process import REPO_ROOT
from nlsflow.errors import NlsflowError
from schemas import STAGES

FLAVORS = {
    "cpu": {"BASE": "python:3.11-slim", "TORCH_INDEX": "https://download.pytorch.org/whl/cpu"},
    "cuda": {
        "BASE": "nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04",
        "TORCH_INDEX": "https://download.pytorch.org/whl/cu128",
    },
    "mounted": {},
}


def interpreter_prefix() -> Path:
    """The installation this checkout's .venv points into, which a mounted image needs at the same path."""
    return Path(sys.base_prefix).resolve()


def build_images(
    flavor: str = "cpu", base: str | None = None, build_args: dict | None = None, network: str | None = None, log=print
) -> list[str]:
    """Build nlsflow-base:<flavor> (the Prefect server and worker) and nlsflow-<stage>:<flavor>; return the tags."""
    if flavor not in FLAVORS:
        raise NlsflowError(f"unknown image flavor {flavor!r}; choose from {sorted(FLAVORS)}")
    if flavor == "mounted" and not base:
        raise NlsflowError("--flavor mounted needs --base: a local image with a root file system (no Python needed)")
    args = FLAVORS[flavor] | ({"BASE": base} if base else {}) | dict(build_args or {})
    tags = []
    with closing(connect()) as client:
        for stage in STAGES if flavor == "mounted" else ("base", *STAGES):
            tag = f"nlsflow-{stage}:{flavor}"
            log(f"building {tag}")
            if flavor == "mounted":
                dockerfile = (REPO_ROOT / "docker" / "Dockerfile.mounted").read_bytes()
                build = dict(
                    fileobj=io.BytesIO(dockerfile), buildargs=args | {"PROJECT": str(REPO_ROOT), "STAGE": stage}
                )
            else:
                build = dict(path=str(REPO_ROOT), dockerfile="docker/Dockerfile", target=stage, buildargs=args)
            try:
                for item in client.api.build(tag=tag, rm=True, decode=True, network_mode=network, **build):
                    if line := item.get("stream", "").rstrip():
                        log(line)
                    if "error" in item:
                        raise NlsflowError(f"building {tag} failed: {item['error'].strip().splitlines()[-1]}")
            except APIError as e:
                raise NlsflowError(f"building {tag} failed: {e.explanation}") from None
            tags.append(tag)
    return tags


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.images", description=__doc__.splitlines()[0])
    parser.add_argument("--flavor", default="cpu", choices=sorted(FLAVORS))
    parser.add_argument("--base", help="the base image (defaults per flavor; required for mounted)")
    parser.add_argument(
        "--build-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="e.g. TORCH_INDEX=..., PIP_FIND_LINKS=http://host/wheels/ (a local wheelhouse)",
    )
    parser.add_argument("--network", help="network for RUN steps, e.g. host where the engine has no bridge")
    args = parser.parse_args(argv)
    if bad := [a for a in args.build_arg if "=" not in a]:
        parser.error(f"--build-arg {bad[0]!r} is not KEY=VALUE")
    try:
        build_images(args.flavor, args.base, dict(a.split("=", 1) for a in args.build_arg), args.network)
    except NlsflowError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
