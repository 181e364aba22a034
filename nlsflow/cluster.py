"""Scoring pools: resident workers that each load the model once and score whatever they are handed.

    with scoring_pool(load_scorer, workers=4, cluster=cfg.cluster, device=cfg.device) as pool:
        for index, result, seconds in pool(items):   # in the order they finish
            ...

`load_scorer` is a picklable callable run once in each worker (loading the super-network there); it returns the
function that scores one item. One worker and no `cluster.address` is this process (`LocalPool`); anything else
is Ray (`ray_pool`). Each worker holds one item at a time, so a worker that dies loses only that item,
which goes to another worker; a worker lost for good, or a cluster that cannot host the workers, stops the
stage with one line. An existing cluster is joined by address (`ray start --head` prints it); with none given, a
local one is started with this machine's CPUs and GPUs and shut down afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from nlsflow.errors import NlsflowError
from schemas.config import ClusterConfig

log = logging.getLogger(__name__)

Scorer = Callable[[Any], Any]


class LocalPool:
    """One worker, in this process: the scorer loaded once, the items scored in order."""

    workers = 1

    def __init__(self, load_scorer: Callable[[], Scorer]):
        started = time.perf_counter()
        self.score_one = load_scorer()
        self.load_seconds = [time.perf_counter() - started]

    def __call__(self, items: list) -> Iterator[tuple[int, Any, float]]:
        for index, item in enumerate(items):
            started = time.perf_counter()
            yield index, self.score_one(item), time.perf_counter() - started


@contextlib.contextmanager
def scoring_pool(
    load_scorer: Callable[[], Scorer], workers: int, cluster: ClusterConfig, device: str
) -> Iterator[LocalPool | RayPool]:
    """`workers` resident scorers: in this process when one and no cluster address is given, else on Ray."""
    if workers == 1 and not cluster.address:
        yield LocalPool(load_scorer)
        return
    with ray_pool(
        load_scorer,
        workers,
        address=cluster.address,
        cpus_per_worker=cluster.cpus_per_worker,
        gpus_per_worker=cluster.gpus_per_worker,
        device=device,
        retries=cluster.retries,
    ) as pool:
        yield pool


class _Worker:
    """A Ray actor: the scorer, loaded once."""

    def __init__(self, load_scorer: Callable[[], Scorer], threads: int):
        import torch

        torch.set_num_threads(threads)
        started = time.perf_counter()
        self.score_one = load_scorer()
        self.load_seconds = time.perf_counter() - started

    def ready(self) -> float:
        return self.load_seconds

    def score(self, item) -> tuple[Any, float]:
        started = time.perf_counter()
        return self.score_one(item), time.perf_counter() - started


class RayPool:
    """`pool(items)` yields (index, result, seconds) for every item as workers finish them."""

    def __init__(self, actor_class, load_scorer, workers: int, options: dict, threads: int, retries: int):
        self.actor_class, self.load_scorer, self.options, self.threads = actor_class, load_scorer, options, threads
        self.retries = retries
        self.actors = [self._start() for _ in range(workers)]
        self.load_seconds = self._wait_ready(self.actors)

    def close(self) -> None:
        """End this pool's workers (the cluster stays)."""
        import ray

        for actor in self.actors:
            ray.kill(actor)

    @property
    def workers(self) -> int:
        return len(self.actors)

    def _start(self):
        return self.actor_class.options(**self.options).remote(self.load_scorer, self.threads)

    def _wait_ready(self, actors) -> list[float]:
        import ray

        refs = [a.ready.remote() for a in actors]
        try:
            ready, waiting = ray.wait(refs, num_returns=len(refs), timeout=_READY_TIMEOUT_S)
            if waiting:
                raise NlsflowError(
                    f"{len(waiting)} of {len(refs)} Ray workers were not ready within {_READY_TIMEOUT_S} s (each "
                    f"asks for {self.options}): the cluster is busy or lacks the resources, or loading the model is "
                    "that slow; lower the workers or their CPUs/GPUs (`ray status` shows what is pending)"
                )
            return ray.get(ready)
        except BaseException as e:  # none of these workers stays behind
            for actor in actors:
                ray.kill(actor)
            if isinstance(e, ray.exceptions.RayError):
                raise NlsflowError(f"a Ray worker failed while loading the model: {_worker_error(e)}") from None
            raise

    def __call__(self, items: list) -> Iterator[tuple[int, Any, float]]:
        import ray

        todo = list(range(len(items)))[::-1]  # popped from the end: first asked, first handed out
        running: dict[Any, tuple[Any, int]] = {}  # ref -> (actor, index)
        failures: dict[int, int] = {}
        idle = list(self.actors)
        while todo or running:
            while todo and idle:
                actor, index = idle.pop(), todo.pop()
                running[actor.score.remote(items[index])] = (actor, index)
            (ref,), _ = ray.wait(list(running), num_returns=1)
            actor, index = running.pop(ref)
            try:
                score, seconds = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as e:
                failures[index] = failures.get(index, 0) + 1
                if failures[index] > self.retries:
                    raise NlsflowError(
                        f"item {index} was lost with its worker {failures[index]} times (last: {_last_line(e)}); "
                        "the workers run out of memory or crash: give them more memory (fewer workers per node, "
                        "or more cluster.cpus_per_worker) or a smaller generation batch_size"
                    ) from None
                log.warning("a Ray worker died (%s); its item goes to another worker", _last_line(e))
                self.actors.remove(actor)
                replacement = self._start()
                self._wait_ready([replacement])
                self.actors.append(replacement)
                idle.append(replacement)
                todo.append(index)
                continue
            except ray.exceptions.RayTaskError as e:
                if "OutOfMemoryError" in str(e):
                    raise NlsflowError(
                        f"a Ray worker ran out of GPU memory scoring item {index} ({_last_line(e)}); lower the "
                        "generation batch_size, or give each worker more of a GPU (cluster.gpus_per_worker)"
                    ) from None
                raise NlsflowError(f"scoring failed in a Ray worker: {_worker_error(e)}") from None
            except ray.exceptions.RayError as e:
                raise NlsflowError(f"the Ray cluster failed while scoring item {index}: {_last_line(e)}") from None
            idle.append(actor)
            yield index, score, seconds


_READY_TIMEOUT_S = 600


def _last_line(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(error).__name__


def _worker_error(error) -> str:
    """The exception a worker raised, as it raised it (a Ray error wraps it in its traceback)."""
    cause = getattr(error, "cause", None)
    return str(cause) if isinstance(cause, NlsflowError) else _last_line(cause or error)


def _check_reachable(address: str) -> None:
    """Ray retries an unreachable head for minutes: one line at once instead."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except (OSError, ValueError) as e:
        raise NlsflowError(
            f"cannot reach the Ray cluster at {address} ({e}); check cluster.address (the head's host:port, as "
            "`ray start --head` prints it)"
        ) from None


def _check_fits(resources: dict, workers: int, cpus: float, gpus: float) -> None:
    """Refuse at once what the cluster can never host (Ray would leave the workers pending)."""
    for name, each in (("CPU", cpus), ("GPU", gpus)):
        have = resources.get(name, 0)
        if workers * each > have:
            raise NlsflowError(
                f"{workers} workers x {each:g} {name} need {workers * each:g} {name}s but the Ray cluster has "
                f"{have:g}; lower the workers or their {name}s, or add machines to the cluster"
            )


@contextlib.contextmanager
def ray_pool(
    load_scorer: Callable[[], Scorer],
    workers: int,
    address: str | None = None,
    cpus_per_worker: float = 1,
    gpus_per_worker: float | None = None,
    device: str = "cpu",
    retries: int = 2,
) -> Iterator[RayPool]:
    """`workers` resident workers on the cluster at `address` (None: a new local one, stopped on exit).

    `gpus_per_worker` None: one GPU each when `device` asks for CUDA, or is 'auto' and the cluster has GPUs."""
    import ray

    started_here, pool = not ray.is_initialized(), None
    try:
        if started_here:
            _connect(address)
        resources = ray.cluster_resources()
        if gpus_per_worker is None:
            gpus_per_worker = 1 if device.startswith("cuda") or (device == "auto" and resources.get("GPU")) else 0
        _check_fits(resources, workers, cpus_per_worker, gpus_per_worker)
        options = {"num_cpus": cpus_per_worker, "num_gpus": gpus_per_worker, "max_restarts": 0}
        pool = RayPool(ray.remote(_Worker), load_scorer, workers, options, max(1, int(cpus_per_worker)), retries)
        log.info(
            "Ray: %d workers ready (%s each), model loaded in %.1f s on average",
            workers,
            f"{cpus_per_worker:g} CPU, {gpus_per_worker:g} GPU",
            sum(pool.load_seconds) / len(pool.load_seconds),
        )
        yield pool
    finally:
        if started_here:  # a local cluster ends, and a joined one keeps nothing of ours: our workers end with us
            ray.shutdown()
        elif pool is not None:  # the caller's connection: only our workers go
            pool.close()


def _connect(address: str | None) -> None:
    """Join the cluster at `address`, or start a new local one; the stage's own signal handlers stay in place."""
    import ray

    if address and address != "auto":
        _check_reachable(address)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        # a local cluster's workers import what this process imports; a remote one's have the project installed
        runtime_env = None if address else {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}}
        ray.init(
            address=address or "local",  # not RAY_ADDRESS's or a `ray start` cluster found on this machine
            runtime_env=runtime_env,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"Ray cluster at {address}" if address else "a local Ray cluster"
        fix = "check cluster.address (`ray status` on the head node)" if address else "see `ray start --head`"
        raise NlsflowError(f"cannot reach {where} ({_last_line(e)}); {fix}") from None
    finally:
        if threading.current_thread() is threading.main_thread():  # ray.init replaces SIGTERM's with sys.exit
            for sig, handler in handlers.items():
                if handler is not None and signal.getsignal(sig) is not handler:
                    signal.signal(sig, handler)
