"""Where the work of preparing a dataset runs: in this process, or in Ray tasks spread over
the cluster's CPUs.

A job is a function and its arguments; `map` runs a list of them and yields (job number,
result) as each one finishes. `InProcess` runs them one after another here; `OnRay` runs each
as a Ray task, with a few per CPU in flight so that the arguments waiting in the object store
stay bounded however many jobs there are; `Auto` picks one of the two on its first call, by
how many images the work decodes.

Plain Ray tasks rather than a Ray Data pipeline: a job is a whole shard (read, decode and write
one Parquet file) and only a few numbers come back, so there is no stream of blocks between
operators for Ray Data to manage. A job's function must live in an importable module, and
that module should not import torch (each task's process would then carry it).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

from tlray.errors import TlrayError

Job = tuple  # the arguments of one call


class RayPaysFrom(NamedTuple):
    """From how many images Ray finishes first on one 2-core machine (the crossovers
    `tlray benchmark prepare|predict` print): with a cluster already running, and where the
    command must start Ray itself. A cluster of several machines pays sooner; `--engine ray`
    says so."""

    running: int
    starting: int

    def now(self) -> int:
        """The crossover that applies to this process: a cluster counts as running when
        `RAY_ADDRESS` names one (as under `ray job submit`) or this process is connected."""
        ray = sys.modules.get("ray")
        connected = ray is not None and ray.is_initialized()
        return self.running if connected or os.environ.get("RAY_ADDRESS") else self.starting

    def said(self) -> str:
        return f"{self.running:,} images with a Ray cluster running, else {self.starting:,}"


class InProcess:
    """Runs every job here, one after another, in order."""

    def map(self, fn: Callable, jobs: Iterable[Job], *, images: int = 0,
            what: str = "work") -> Iterator[tuple[int, Any]]:
        for number, args in enumerate(jobs):
            yield number, fn(*args)


class OnRay:
    """Runs every job as a Ray task; results come back as tasks finish.

    Args:
        connect: joins or starts the Ray cluster on first use (the CLI passes tlray's own
            `init_ray`); by default a plain `ray.init()` unless Ray is already initialised.
        cpus_per_task: what each task reserves.
    """

    IN_FLIGHT_PER_CPU = 2

    def __init__(self, connect: Callable[[], None] | None = None, cpus_per_task: float = 1.0):
        self.connect = connect or join_or_start_ray
        self.cpus_per_task = cpus_per_task

    def map(self, fn: Callable, jobs: Iterable[Job], *, images: int = 0,
            what: str = "work") -> Iterator[tuple[int, Any]]:
        import ray

        self.connect()
        task = ray.remote(fn).options(num_cpus=self.cpus_per_task)
        cpus = ray.cluster_resources().get("CPU", 1.0)
        window = max(2, int(self.IN_FLIGHT_PER_CPU * cpus / self.cpus_per_task))
        waiting = enumerate(jobs)
        pending: dict = {}  # ObjectRef -> job number
        try:
            while True:
                for number, args in waiting:
                    pending[task.remote(*args)] = number
                    if len(pending) >= window:
                        break
                if not pending:
                    return
                (ref,), _ = ray.wait(list(pending), num_returns=1)
                with lost_work_explained(what):
                    result = ray.get(ref)
                yield pending.pop(ref), result
        finally:
            for ref in pending:  # stopped early (an error, Ctrl-C): nothing more is written
                ray.cancel(ref, force=True)


class Auto:
    """In this process for small work, on Ray from `from_images` decoded images on: decided
    on the first call, kept for the later ones (a dataset is written in one place)."""

    def __init__(self, here: InProcess, ray: OnRay, from_images: int):
        self.here, self.ray, self.from_images = here, ray, from_images
        self.chosen: InProcess | OnRay | None = None

    def map(self, fn: Callable, jobs: Iterable[Job], *, images: int = 0,
            what: str = "work") -> Iterator[tuple[int, Any]]:
        if self.chosen is None:
            self.chosen = self.ray if images >= self.from_images else self.here
        return self.chosen.map(fn, jobs, images=images, what=what)


def join_or_start_ray() -> None:
    """A plain `ray.init()` unless this process is already connected (tlray's CLI connects
    first with `tlray.train.cluster.init_ray`)."""
    import ray

    if not ray.is_initialized():
        ray.init(logging_level="ERROR")


@contextmanager
def lost_work_explained(what: str):
    """Work lost with its process or machine (a worker killed for memory, a node gone) is the
    user's to retry: one line. An exception raised by the work itself passes unchanged."""
    import ray.exceptions as rex

    names = ("WorkerCrashedError", "NodeDiedError", "LocalRayletDiedError", "ObjectLostError",
             "OutOfMemoryError", "ActorDiedError", "TaskUnschedulableError",
             "ActorUnschedulableError")
    try:
        yield
    except tuple(getattr(rex, name) for name in names if hasattr(rex, name)) as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise TlrayError(f"{what}: a Ray worker died before the work was done "
                         f"({type(e).__name__}: {first}); nothing was written, run it again"
                         ) from None
