"""How many threads a CPU training worker uses: the CPUs it holds, plus a share of idle ones.

Ray reserves CPUs logically; torch computes with as many threads as it is told. A sweep on a
laptop ends with one trial running alone beside CPUs no trial holds any more (ASHA stopped
the others), and a single run leaves idle what Ray Data does not use. So a one-worker CPU
run on a one-node cluster counts again before every epoch: its own CPUs, plus an equal
share, among the runs like it that hold CPUs now, of the CPUs nobody holds.

Ray's own way to hand freed CPUs to live trials, `ResourceChangingScheduler`, restarts a
trial from its checkpoint to change its reservation and cannot reuse trial processes; a
thread count changes for free. What is borrowed is not reserved: a trial Ray starts
meanwhile shares the CPUs until the next epoch.
"""

from __future__ import annotations

import math
import os

_EPS = 1e-6


def own_threads(cpus: float) -> int:
    """Threads for the CPUs a worker holds: Ray's rule (int(num_cpus), at least 1), rounded."""
    return max(1, round(cpus))


def borrowed_threads(cpus: float) -> int:
    """`own_threads(cpus)`, raised by this worker's share of the one node's idle CPUs."""
    import ray

    own = own_threads(cpus)
    try:
        if sum(1 for node in ray.nodes() if node.get("Alive")) != 1:
            return own  # idle CPUs may be on another machine
        total = ray.cluster_resources().get("CPU", 0.0)
        free = ray.available_resources().get("CPU", 0.0)
    except Exception:  # noqa: BLE001 - no answer from Ray: keep what is reserved
        return own
    runs = max(1, math.floor((total - free) / cpus + _EPS))  # runs holding as much as this
    share = math.floor(cpus + free / runs + _EPS)
    return max(own, min(share, os.cpu_count() or 1))
