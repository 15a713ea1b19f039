"""A one-worker CPU run computes on the CPUs it holds plus its share of the idle ones."""

from __future__ import annotations

import os
import sys

import pytest
import ray.cloudpickle

from tlray.train.threads import borrowed_threads, own_threads

pytestmark = pytest.mark.ray
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers can't import tests/


@ray.remote(num_cpus=1)
class Run:
    """Stands for a trial that holds one CPU of the test cluster's four."""

    def threads(self) -> tuple[int, int]:
        return borrowed_threads(1.0), os.cpu_count()


def threads_of(n_runs: int) -> list[tuple[int, int]]:
    runs = [Run.remote() for _ in range(n_runs)]
    ray.get([r.__ray_ready__.remote() for r in runs])
    try:
        return ray.get([r.threads.remote() for r in runs])
    finally:
        for r in runs:
            ray.kill(r)


def test_runs_share_the_idle_cpus_up_to_the_machine_cores(ray_cluster):
    assert ray.cluster_resources()["CPU"] == 4
    [(alone, cores)] = threads_of(1)
    assert alone == min(4, cores)  # its own CPU and the three nobody holds
    assert [t for t, _ in threads_of(2)] == [min(2, cores)] * 2  # one idle CPU each
    assert [t for t, _ in threads_of(3)] == [1] * 3  # a third of one idle CPU: nothing


def test_own_threads_follow_ray_rule():
    assert [own_threads(c) for c in (0.25, 0.75, 1.0, 2.0, 2.6)] == [1, 1, 1, 2, 3]
