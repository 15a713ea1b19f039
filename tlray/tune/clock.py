"""The sweep's remaining time, from what its epochs have cost so far, kind by kind.

Trials of different freeze depths cost differently per epoch (deep freezing trains less, and
a frozen front may be read from the feature cache), so each epoch to come is estimated at
its own depth's epoch time (a freeze schedule's epochs at their phase's depth): the mean of
the epochs seen at that depth, or of all epochs for a depth not seen yet. Said first once
every trial that has started has an epoch (and as many have started as run at once) and
the depths the running trials will train at have been timed (a head-first schedule's
later phases cost several times its first), then again as trials end. An estimate, so "about": ASHA stops some
trials early, and a machine that gets busier slows the rest.
"""

from __future__ import annotations

from collections import defaultdict

from tlray.config.schedule import parse as parse_schedule
from tlray.config.schedule import phase_at
from tlray.train.progress import format_seconds
from tlray.train.protocol import is_final


class SweepClock:
    """Args: `kinds`, the kind (freeze depth) of each planned trial in the order they start,
    when the search knows them up front (a stratified design); None otherwise."""

    def __init__(self, trials: int, epochs: int, concurrency: int,
                 kinds: list[str] | None = None):
        self.trials, self.epochs, self.kinds = trials, epochs, kinds
        self.concurrency = max(1, min(concurrency, trials))
        self.done: dict[str, int] = {}  # trial -> epochs reported
        self.kind_of: dict[str, str] = {}
        self.ended: set[str] = set()
        self.seconds: dict[str, list[float]] = defaultdict(list)
        self.said = False

    def observe(self, trial: str, kind: str, epoch: int, epoch_seconds: float,
                started: list[str]) -> str | None:
        """A trial's epoch report; returns the line to print the first time there is one."""
        self.done[trial] = max(self.done.get(trial, 0), epoch)
        self.kind_of[trial] = kind
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
        phases = parse_schedule(kind)
        return phases[phase_at(phases, epoch)].depth

    def _untimed(self, started: list[str]) -> bool:
        """Whether a running trial has epochs to come at a depth not timed yet."""
        return any(self.depth(self.kind_of[t], e) not in self.seconds
                   for t in started if t not in self.ended
                   for e in range(self.done[t] + 1, self.epochs + 1))

    def trial_ended(self, trial: str, started: list[str]) -> str | None:
        """A trial that completed or was stopped; returns the updated line, once said."""
        self.ended.add(trial)
        if not self.said or len(self.ended) >= self.trials:
            return None
        return self.line(started)

    def line(self, started: list[str]) -> str:
        every = [s for seconds in self.seconds.values() for s in seconds]
        overall = sum(every) / len(every)

        def per_epoch(kind: str | None) -> float:
            seen = self.seconds.get(kind)
            return sum(seen) / len(seen) if seen else overall

        def trial_seconds(kind: str | None, first_epoch: int) -> float:
            return sum(per_epoch(self.depth(kind, e))
                       for e in range(first_epoch, self.epochs + 1))

        running = [t for t in started if t not in self.ended]
        left = {t: self.epochs - self.done.get(t, 0) for t in running}
        work = sum(trial_seconds(self.kind_of.get(t), self.done.get(t, 0) + 1)
                   for t in running)
        to_come = self.trials - len(started)
        kinds = (self.kinds or [])[len(started):len(started) + to_come]
        kinds += [None] * (to_come - len(kinds))
        work += sum(trial_seconds(k, 1) for k in kinds)
        epochs_left = sum(left.values()) + self.epochs * to_come
        costs = ", ".join(f"~{sum(s) / len(s):.0f} s at freeze {k}"
                          for k, s in sorted(self.seconds.items()))
        return (f"sweep: about {format_seconds(work / self.concurrency)} left ({epochs_left} "
                f"trial epochs to go; an epoch takes {costs}; {self.concurrency} at a time; "
                f"ASHA may stop some trials early)")


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
