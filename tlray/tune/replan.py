"""Revising a budget plan as trials end: the decisions a sweep's callbacks ask for.

Ahead of plan (epochs cheaper than planned, ASHA stopping more), `trials_to_add` says how
many more trials still end in time; behind, `can_start` refuses a trial that could not
reach ASHA's first rung and be tested before the budget ends (a started trial stops itself
before an epoch that would end too late, `tlray.train.deadline`, and is tested: it can win).
Both are asked again as each trial ends, with the costs measured so far, so they can be
cautious: a running trial is taken to train to the end, and an added one to survive every
rung; what ASHA stops early frees time the next question sees.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import cycle, islice

from tlray.tune.budget import MARGIN, TRIALS_PER_CHOICE, SweepPlan
from tlray.tune.makespan import (Costs, Run, epoch_seconds, min_epochs, replay,
                                 trial_seconds)


@dataclass(frozen=True)
class Running:
    """A trial in flight: its freeze choice, epochs reported, seconds since the last one."""

    kind: str
    epochs_done: int
    into_epoch_s: float = 0.0


def can_start(plan: SweepPlan, costs: Costs, elapsed_s: float, kind: str) -> bool:
    """Whether a trial of `kind` starting now can train to the first epoch ASHA judges it at
    (every epoch where nothing is stopped; a schedule's last phase begun), be tested and
    logged, and the sweep still end within its budget.

    Less than every epoch: the time a sweep has left at its end goes to a trial that
    trains what fits and is tested, rather than to nothing."""
    epochs = max(min_epochs(kind), min(plan.grace_period, plan.epochs))
    end = elapsed_s + trial_seconds(kind, epochs, costs, plan.cached) + costs.wrapup_s
    return end <= plan.budget_s


def trials_to_add(plan: SweepPlan, costs: Costs, elapsed_s: float,
                  running: Sequence[Running], started: int,
                  new_kinds: Sequence[str] | None = None) -> int:
    """How many trials can be added and the sweep still end within the budget less MARGIN.

    Args:
        elapsed_s: seconds since the sweep started (its setup included).
        running: the trials in flight.
        started: how many of the plan's trials have started; the rest start as planned.
        new_kinds: the added trials' freeze choices, in order (e.g. `space.more_trials`'s);
            by default the plan's choices in turn, up to the plan's cap.
    """
    if new_kinds is None:
        room = TRIALS_PER_CHOICE * len(plan.choices) - plan.trials
        new_kinds = list(islice(cycle(plan.choices), max(0, room)))
    free_at = [elapsed_s + _rest(r, plan, costs) for r in running]
    free_at += [elapsed_s] * (plan.slots - len(free_at))
    queued = [Run(k, s, s == plan.epochs)
              for k, s in zip(plan.kinds[started:], plan.stops[started:])]
    built = {depth: 0.0 for depth in plan.cached}  # its first trial started long ago
    limit = plan.budget_s * (1 - MARGIN) - costs.wrapup_s
    added = 0
    for kind in new_kinds:
        queued.append(Run(kind, plan.epochs, True))
        if replay(queued, free_at, costs, plan.cached, built) > limit:
            break
        added += 1
    return added


def _rest(trial: Running, plan: SweepPlan, costs: Costs) -> float:
    """What a running trial has left if it trains to the end (its in-flight epoch less
    what it has run of it)."""
    left = epoch_seconds(trial.kind, trial.epochs_done + 1, plan.epochs, costs, plan.cached)
    next_epoch = epoch_seconds(trial.kind, trial.epochs_done + 1,
                               min(trial.epochs_done + 1, plan.epochs), costs, plan.cached)
    return left - min(trial.into_epoch_s, next_epoch) + costs.finish_s
