"""Keeping a running sweep inside its time budget (`tune.budget`).

Before a trial starts, the guard asks whether it can still reach ASHA's first rung, be tested
and logged before the budget ends, from the costs measured so far (the epochs trials have
reported, depth by depth, over the calibration's; `replan.can_start`); if not, it does not
start, and once no trial runs the sweep ends (its results so far are picked from as usual).
The search algorithm asks the guard before it creates a trial (`GuardedVariants`,
`GuardedSearch`): Tune starts every trial it is handed as soon as a slot is free, whatever
its scheduler prefers. A trial that did start ends its own training in time
(`tlray.train.deadline`). What the sweep does when it is ahead of its plan (more trials) is
`tlray.tune.budgeted.trials_in_time_left`'s.
"""

from __future__ import annotations

import time
import types
from dataclasses import replace

from ray import tune
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.search.search_generator import SearchGenerator

from tlray.config.interval import format_span
from tlray.config.schedule import depth_at
from tlray.train.protocol import is_final, is_partial
from tlray.tune.budget import SweepPlan
from tlray.tune.makespan import Costs
from tlray.tune.replan import can_start


class BudgetGuard(tune.Callback, tune.Stopper):
    """A Tune callback and stopper in the sweep's driver.

    Args:
        started_at: `time.time()` when the command started: the budget is the user's wait.
    """

    def __init__(self, plan: SweepPlan, started_at: float, clock=time.time):
        self.plan, self.started_at, self.clock = plan, started_at, clock
        self.seconds: dict[str, list[float]] = {}  # depth -> the epochs trials reported
        self.starts: list[float] = []  # a trial's start: until its first epoch began
        self.finishes: list[float] = []  # a completed trial's end: after its last epoch
        # Trials that did not start, no time being left for them: their settings, for the
        # sweep's table.
        self.refused_configs: dict[str, dict] = {}
        self.started: set[str] = set()
        self.asked: list[dict] = []  # every trial's settings the search asked about
        self._began: dict[str, float] = {}  # trial -> when Tune started it
        self._reported: dict[str, float] = {}  # trial -> when its last epoch was reported
        self._trials: list = []
        self.on_guard = True  # False once restored with a resumed sweep (__getstate__)

    def __getstate__(self) -> dict:
        """What Tune saves with the sweep's state (with its search algorithm, its callbacks
        and stoppers): not the trials, and a guard that stands down once restored. A resumed
        sweep has no budget (it counted from the first command; `sweep.sweep` plans none on
        resume, and its trials get no deadline), so it refuses no trial."""
        return {**self.__dict__, "_trials": [], "on_guard": False}

    @property
    def refused(self) -> set[str]:
        """The trials that did not start."""
        return set(self.refused_configs)

    def elapsed(self) -> float:
        return self.clock() - self.started_at

    def costs(self) -> Costs:
        """The plan's costs with what the trials have measured so far: every depth's epochs,
        a trial's start and a completed trial's end (its test and logging)."""
        measured = {d: sum(s) / len(s) for d, s in self.seconds.items()}
        costs = self.plan.costs.with_measured(measured, self.plan.cached)
        return replace(costs, **{k: sum(v) / len(v) for k, v in (("trial_s", self.starts),
                                                                 ("finish_s", self.finishes))
                                 if v})

    def may_start(self, trial) -> bool:
        """Whether `trial` can end in time; a refused one is remembered (and stays refused).
        The first trial always starts: the plan found room for it, and a sweep with no
        trial has nothing to give."""
        kind, trial_id = str(trial.config.get("model.freeze")), trial.trial_id
        if not self.on_guard:
            return True
        if trial_id in self.started or trial_id in self.refused:
            return trial_id in self.started  # asked again: the same answer
        self.asked.append(dict(trial.config))
        if self.started and not can_start(self.plan, self.costs(), self.elapsed(), kind):
            self.refused_configs[trial_id] = dict(trial.config)
            print(f"sweep: trial {trial_id} (freeze {kind}) does not start: it could not "
                  f"end within the {format_span(self.plan.budget_s)} budget", flush=True)
            return False
        self.started.add(trial_id)
        return True

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self._trials = trials
        if "epoch_seconds" not in result or is_final(result) or is_partial(result):
            return
        seconds, epoch, now = float(result["epoch_seconds"]), int(result["epoch"]), self.clock()
        depth = depth_at(str(trial.config.get("model.freeze")), epoch)
        self.seconds.setdefault(depth, []).append(seconds)
        if epoch == 1 and trial.trial_id in self._began:
            self.starts.append(max(0.0, now - seconds - self._began[trial.trial_id]))
        self._reported[trial.trial_id] = now

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._trials = trials
        self._began.setdefault(trial.trial_id, self.clock())

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        last = self._reported.get(trial.trial_id)
        if last is not None and trial.last_result.get("final"):
            self.finishes.append(self.clock() - last)

    def __call__(self, trial_id: str, result: dict) -> bool:
        # Never cut off here (it would be neither tested nor logged): a started trial
        # stops itself before an epoch that would end too late (tlray.train.deadline).
        return False

    def stop_all(self) -> bool:
        """Ends the sweep once a trial was refused and none runs."""
        return (self.on_guard and bool(self.refused)
                and not any(t.status == "RUNNING" for t in self._trials))

    def not_started(self, planned: list[dict] = ()) -> list:
        """The trials that did not start for want of time, as results with no metrics: the
        refused ones, in the order they were refused, then those of `planned` (the design's
        settings, in order) that the search never created, the sweep having ended first.
        The sweep's table lists them all as not started."""
        rows = list(self.refused_configs.items())
        asked = list(self.asked)
        for i, point in enumerate(planned):
            match = next((c for c in asked if all(c.get(k) == v for k, v in point.items())),
                         None)
            if match is None:
                rows.append((f"not-created-{i + 1}", dict(point)))
            else:
                asked.remove(match)
        return [types.SimpleNamespace(trial_id=trial_id, config=config, metrics={},
                                      error=None, checkpoint=None)
                for trial_id, config in rows]


class _AsksTheGuard:
    """A search algorithm that creates a trial only when the budget guard (if any) lets it
    start. A refused trial is never handed to Tune, and its place among the trials running
    at once is given back at once, as for a trial that ended."""

    guard: BudgetGuard | None = None

    def next_trial(self):
        trial = super().next_trial()
        if trial is None or self.guard is None or self.guard.may_start(trial):
            return trial
        self.on_trial_complete(trial.trial_id, result=None, error=True)
        return None


class GuardedVariants(_AsksTheGuard, BasicVariantGenerator):
    """Tune's `BasicVariantGenerator` (stratified and random search), guarded."""

    def __init__(self, guard: BudgetGuard | None, **kwargs):
        super().__init__(**kwargs)
        self.guard = guard


class GuardedSearch(_AsksTheGuard, SearchGenerator):
    """Tune's `SearchGenerator` over a `Searcher` (Optuna's), guarded."""

    def __init__(self, guard: BudgetGuard | None, searcher):
        super().__init__(searcher)
        self.guard = guard
