"""The sweep's remaining time, from what its epochs have cost so far, kind by kind.

Trials of different freeze depths cost differently per epoch (deep freezing trains less, and
a frozen front may be read from the feature cache), so each epoch to come is estimated at
its own depth's epoch time (a freeze schedule's epochs at their phase's depth): the mean of
the epochs seen at that depth, or of all epochs for a depth not seen yet. Said first once
every trial that has started has an epoch (and as many have started as run at once) and
the depths the running trials will train at have been timed (a head-first schedule's
later phases cost several times its first), then again as trials end.

The time left is when the last trial would end if the trials still to start took the first
free slot (a running trial's in-flight epoch counts what is left of it), not the work
divided by the slots: the last trial's tail runs alone. An estimate, so "about": ASHA stops
some trials early, and a machine that gets busier slows the rest.
"""

from __future__ import annotations

import heapq
import time
from collections import defaultdict

from tlray.config.schedule import depth_at
from tlray.train.progress import format_seconds
from tlray.train.protocol import is_final


class SweepClock:
    """Args: `kinds`, the kind (freeze depth) of each planned trial in the order they start,
    when the search knows them up front (a stratified design); None otherwise."""

    def __init__(self, trials: int, epochs: int, concurrency: int,
                 kinds: list[str] | None = None, clock=time.monotonic):
        self.trials, self.epochs, self.kinds = trials, epochs, kinds
        self.concurrency = max(1, min(concurrency, trials))
        self.done: dict[str, int] = {}  # trial -> epochs reported
        self.kind_of: dict[str, str] = {}
        self.ended: set[str] = set()
        self.seconds: dict[str, list[float]] = defaultdict(list)
        self.reported_at: dict[str, float] = {}  # trial -> clock() at its last epoch
        self.clock = clock
        self.said = False

    def observe(self, trial: str, kind: str, epoch: int, epoch_seconds: float,
                started: list[str]) -> str | None:
        """A trial's epoch report; returns the line to print the first time there is one."""
        self.done[trial] = max(self.done.get(trial, 0), epoch)
        self.kind_of[trial] = kind
        self.reported_at[trial] = self.clock()
        self.seconds[self.depth(kind, epoch)].append(epoch_seconds)
        if self.said or len(started) < self.concurrency or any(
                t not in self.done for t in started) or self._untimed(started):
            return None
        self.said = True
        return self.line(started)

    def depth(self, kind: str | None, epoch: int) -> str | None:
        """The frozen depth epoch `epoch` of a trial of `kind` trains at."""
        if kind is None or kind == "None":
            return kind
        return depth_at(kind, epoch)

    def _untimed(self, started: list[str]) -> bool:
        """Whether a running trial has epochs to come at a depth not timed yet."""
        return any(self.depth(self.kind_of[t], e) not in self.seconds
                   for t in self._running(started)
                   for e in range(self.done[t] + 1, self.epochs + 1))

    def trial_ended(self, trial: str, started: list[str]) -> str | None:
        """A trial that completed or was stopped; returns the updated line, once said and
        while an epoch is left to train (the last trials end a few seconds apart)."""
        self.ended.add(trial)
        if not self.said or self._epochs_left(started) == 0:
            return None
        return self.line(started)

    def _running(self, started: list[str]) -> list[str]:
        return [t for t in started if t not in self.ended]

    def _epochs_left(self, started: list[str]) -> int:
        return (sum(self.epochs - self.done.get(t, 0) for t in self._running(started))
                + self.epochs * (self.trials - len(started)))

    def line(self, started: list[str]) -> str:
        running = self._running(started)
        to_come = self.trials - len(started)
        epochs_left = self._epochs_left(started)
        costs = ", ".join(f"~{sum(s) / len(s):.0f} s at freeze {k}"
                          for k, s in sorted(self.seconds.items()))
        return (f"sweep: about {format_seconds(self._time_left(running, to_come))} left "
                f"({epochs_left} trial epoch{'s' * (epochs_left != 1)} to go; an epoch takes "
                f"{costs}; {self.concurrency} at a time; ASHA may stop some trials early)")

    def _time_left(self, running: list[str], to_come: int) -> float:
        """When the last trial ends: running trials hold their slots for what they have
        left, and each trial to come takes the first slot that frees."""
        now = self.clock()
        slots = []
        for t in running:
            kind, next_epoch = self.kind_of.get(t), self.done.get(t, 0) + 1
            in_flight = min(now - self.reported_at.get(t, now),
                            self._per_epoch(self.depth(kind, next_epoch)))
            slots.append(self._trial_seconds(kind, next_epoch) - in_flight)
        slots += [0.0] * (self.concurrency - len(slots))
        heapq.heapify(slots)
        kinds = (self.kinds or [])[self.trials - to_come:self.trials]
        for kind in kinds + [None] * (to_come - len(kinds)):
            heapq.heappush(slots, heapq.heappop(slots) + self._trial_seconds(kind, 1))
        return max(slots)

    def _per_epoch(self, depth: str | None) -> float:
        """Mean epoch time at `depth`, or over all epochs for a depth not timed yet."""
        seen = self.seconds.get(depth) or [s for v in self.seconds.values() for s in v]
        return sum(seen) / len(seen)

    def _trial_seconds(self, kind: str | None, first_epoch: int) -> float:
        return sum(self._per_epoch(self.depth(kind, e))
                   for e in range(first_epoch, self.epochs + 1))


def clock_callback(clock: SweepClock):
    """SweepClock as a Tune callback in the sweep's driver."""
    from ray import tune

    def started(trials) -> list[str]:
        return [t.trial_id for t in trials if t.status != "PENDING"]

    class SayRemaining(tune.Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            if "epoch_seconds" not in result or is_final(result):
                return
            say(clock.observe(trial.trial_id, str(trial.config.get("model.freeze")),
                              int(result.get("epoch", iteration)),
                              float(result["epoch_seconds"]), started(trials)))

        def on_trial_complete(self, iteration, trials, trial, **info):
            say(clock.trial_ended(trial.trial_id, started(trials)))

    return SayRemaining()


def say(line: str | None) -> None:
    if line:
        print(line, flush=True)
