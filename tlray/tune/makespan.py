"""How long a sweep takes on its slots, from measured costs: the timing model of the budget
plan (tlray.tune.budget) and of its revision as trials end (tlray.tune.replan).

A trial's epochs are timed at the depth each trains at (a freeze schedule's phases cost
differently, as in SweepClock), from the feature cache where one is used. The trials take
the first slot to free, in the order they start, as SweepClock counts the time left: the
end is when the last trial ends, not the work divided by the slots (the last trial's tail
runs alone).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import NamedTuple

from tlray.config.schedule import depth_at, first_depth, parse, phase_at


@dataclass(frozen=True)
class Costs:
    """Measured seconds a plan is built from: a calibration's, or a running sweep's."""

    epoch_s: dict[str, float]  # an epoch at each frozen depth ("0", "3", "all")
    trial_s: float = 0.0  # a trial's start and its first epoch's warm-up
    finish_s: float = 0.0  # a completed trial's test and model logging
    setup_s: float = 0.0  # the sweep's start, before its first trial
    wrapup_s: float = 0.0  # after its last trial: registering the winner
    cache_build_s: dict[str, float] = field(default_factory=dict)  # per depth, built once
    cached_epoch_s: dict[str, float] = field(default_factory=dict)  # per depth, from it

    def epoch(self, depth: str, cached: bool = False) -> float:
        """An epoch at `depth`; a depth not timed costs the mean of those that were."""
        if cached:
            return self.cached_epoch_s[depth]
        if depth in self.epoch_s:
            return self.epoch_s[depth]
        return sum(self.epoch_s.values()) / len(self.epoch_s)

    def with_measured(self, epoch_s: dict[str, float], cached: Sequence[str] = ()) -> Costs:
        """These costs with a sweep's measured epoch means (a cached depth's from its cache:
        SweepClock files both under the depth)."""
        plain = {d: s for d, s in epoch_s.items() if d not in cached}
        from_cache = {d: s for d, s in epoch_s.items() if d in cached}
        return replace(self, epoch_s={**self.epoch_s, **plain},
                       cached_epoch_s={**self.cached_epoch_s, **from_cache})


class Run(NamedTuple):
    """One trial as a plan sees it: its freeze choice and the epochs it trains."""

    kind: str
    epochs: int
    completes: bool  # trained every epoch: it is tested and its model logged


@lru_cache(maxsize=4096)
def _epoch_depths(kind: str, last: int) -> tuple[tuple[str, bool], ...]:
    """(depth, whether in the first phase) of epochs 1..last of a freeze choice."""
    phases = parse(kind)
    return tuple((depth_at(kind, e), phase_at(phases, e) == 0) for e in range(1, last + 1))


def epoch_seconds(kind: str, first: int, last: int, costs: Costs,
                  cached: Sequence[str] = ()) -> float:
    """Epochs first..last of a trial; a cache serves a choice's first phase only (its first
    depth is what the cache holds: schedule.first_depth)."""
    return sum(costs.epoch(depth, head and depth in cached)
               for depth, head in _epoch_depths(kind, last)[first - 1:])


def trial_seconds(kind: str, epochs: int, costs: Costs, cached: Sequence[str] = ()) -> float:
    """A trial that trains every epoch: its start, its epochs, its test and logging."""
    return costs.trial_s + epoch_seconds(kind, 1, epochs, costs, cached) + costs.finish_s


def min_epochs(kind: str) -> int:
    """The fewest epochs a freeze choice runs in: every phase gets one."""
    return sum(p.epochs or 1 for p in parse(kind))


def replay(runs: Sequence[Run], free_at: list[float], costs: Costs,
           cached: Sequence[str] = (), ready: dict[str, float] | None = None) -> float:
    """When the last slot frees, `runs` each taking the first slot to free, in order.

    Args:
        free_at: when each slot frees (0 for an idle one).
        ready: when each cached depth's cache is (or will be) built; the first run at a
            cached depth not in it builds the cache, the others there wait for it.
    """
    free_at, ready = list(free_at), {} if ready is None else dict(ready)
    heapq.heapify(free_at)
    for run in runs:
        start = heapq.heappop(free_at) + costs.trial_s
        depth = first_depth(run.kind)
        if depth in cached:
            start = max(start, ready.setdefault(depth, start + costs.cache_build_s[depth]))
        heapq.heappush(free_at, start + epoch_seconds(run.kind, 1, run.epochs, costs, cached)
                       + (costs.finish_s if run.completes else 0.0))
    return max(free_at)


def makespan(runs: Sequence[Run], slots: int, costs: Costs,
             cached: Sequence[str] = ()) -> float:
    """Seconds from the first trial's start to the last one's end on `slots` slots."""
    return replay(runs, [0.0] * max(1, min(slots, len(runs))), costs, cached)


def caches_that_pay(runs: Sequence[Run], costs: Costs) -> tuple[str, ...]:
    """Depths whose cache saves more epoch time over these runs than its build costs."""
    paying = []
    for depth, build in costs.cache_build_s.items():
        if depth not in costs.cached_epoch_s:
            continue
        saved_per_epoch = costs.epoch(depth) - costs.cached_epoch_s[depth]
        epochs = sum(head and d == depth for run in runs
                     for d, head in _epoch_depths(run.kind, run.epochs))
        if epochs * saved_per_epoch > build:
            paying.append(depth)
    return tuple(sorted(paying))
