"""A sweep sized to its time budget (`tune.budget`), from the measurement to the last line.

Before the first trial: the costs are measured (`tlray.tune.calibrate`), the plan chosen
(`tlray.tune.budget`), said, and written into the sweep's settings (trials, epochs, ASHA,
trials at once, the freeze choices and the feature cache). While it runs, a `BudgetGuard`
starts no trial that cannot end in time. When its trials have ended with time to spare, more
trials continue its design (`space.more_trials`, as `--more` does), as many as the costs
measured meanwhile say still fit. At the end: planned against actual.
"""

from __future__ import annotations

import dataclasses
import time

from tlray import config as config_mod
from tlray.config.interval import parse_budget
from tlray.train.deadline import Deadline
from tlray.train.plan import Plan
from tlray.tune.budget import (TRIALS_PER_CHOICE, SweepPlan, plan_lines, plan_sweep,
                               planned_vs_actual)
from tlray.tune.budget_guard import BudgetGuard
from tlray.tune.calibrate import calibrate
from tlray.tune.replan import trials_to_add
from tlray.tune.space import more_trials, spread_trials
from tlray.train.threads import own_threads
from tlray.tune.trial import concurrency

# What the user may fix by hand; the plan then keeps it and says so.
FIXABLE = ("tune.num_samples", "train.epochs")


def plan_to_budget(plan: Plan, choices: list[str], fixed: frozenset[str],
                   started_at: float) -> tuple[Plan, list[str], SweepPlan]:
    """The sweep's plan, its freeze choices and its budget plan, sized to `tune.budget`.

    Args:
        fixed: settings the user gave (`FIXABLE` ones win over the plan).
        started_at: `time.time()` when the command started (what it spent so far counts).
    """
    cfg = plan.config
    budget_s = parse_budget(cfg.tune.budget)
    print(f"sweep: measuring what an epoch costs at each freeze depth, to plan "
          f"{cfg.tune.budget}", flush=True)
    costs = calibrate(plan, choices, started_at)

    def design(trials: int) -> list[str]:
        at = config_mod.with_overrides(cfg, **{"tune.num_samples": trials})
        return [p["model.freeze"] for p in spread_trials(at, choices)]

    budget_plan = plan_sweep(
        budget_s, costs, choices, slots(cfg), cfg.train.epochs,
        num_samples=cfg.tune.num_samples if "tune.num_samples" in fixed else None,
        epochs=cfg.train.epochs if "train.epochs" in fixed else None, design=design,
        # A budget the user gave is refused when too small; a recipe's, on a machine slower
        # than the one it was written for, runs its smallest sweep and says so.
        strict="tune.budget" in fixed)
    for line in plan_lines(budget_plan):
        print(line, flush=True)
    kept = [c for c in choices if c in budget_plan.kinds]
    settings = {"tune.num_samples": budget_plan.trials, "train.epochs": budget_plan.epochs,
                "tune.grace_period": budget_plan.grace_period,
                "tune.reduction_factor": budget_plan.reduction_factor,
                "tune.max_concurrent": budget_plan.concurrency,
                "tune.freeze": ";".join(kept)}
    if "train.feature_cache" not in fixed:
        settings["train.feature_cache"] = "auto" if budget_plan.cached else "never"
    cfg = config_mod.with_overrides(cfg, **settings)
    return dataclasses.replace(plan, config=cfg), kept, budget_plan


def slots(cfg) -> int:
    """Trials the plan runs at once: as many as the cluster holds (`trial.concurrency`), but
    on one machine's CPUs no more than its cores run at the threads a trial computes with
    (the costs are measured at those threads; a cluster may count more CPUs than there are
    cores, as a laptop's often does to leave room for Ray Data)."""
    import os

    import ray

    at_once = concurrency(cfg)
    if cfg.scaling.use_gpu or len([n for n in ray.nodes() if n.get("Alive")]) != 1:
        return at_once
    per_trial = own_threads(cfg.scaling.cpus_per_worker) * cfg.scaling.max_workers
    return max(1, min(at_once, (os.cpu_count() or 1) // per_trial))


def trials_in_time_left(budget_guard: BudgetGuard, cfg, choices: list[str],
                        done: list[dict]) -> list[dict]:
    """When the planned trials have ended with time to spare: the trials that continue the
    design (`space.more_trials`) and still end in time, from the costs measured so far."""
    plan = budget_guard.plan
    room = max(0, TRIALS_PER_CHOICE * len(plan.choices) - len(done))
    if room == 0:
        return []
    candidates = more_trials(cfg, choices, done, room)
    n = trials_to_add(plan, budget_guard.costs(), budget_guard.elapsed(), running=[],
                      started=plan.trials, new_kinds=[t["model.freeze"] for t in candidates])
    if n:
        print(f"sweep: ahead of plan: {n} more trial{'s' * (n != 1)} fit in the time left",
              flush=True)
    return candidates[:n]


def trial_deadline(budget_plan: SweepPlan | None, started_at: float,
                   fixed: frozenset[str]) -> Deadline | None:
    """When a budgeted sweep's trials must have ended their training: the budget less a
    trial's test and logging and the sweep's own end, as calibrated. None without a budget,
    or when the user fixed `train.epochs` (their epochs win, as they win over the plan)."""
    if budget_plan is None or "train.epochs" in fixed:
        return None
    costs = budget_plan.costs
    from_cache = {d: costs.cached_epoch_s[d] for d in budget_plan.cached
                  if d in costs.cached_epoch_s}
    return Deadline(started_at + budget_plan.budget_s - costs.finish_s - costs.wrapup_s,
                    {**costs.epoch_s, **from_cache})


def trial_uncached_depths(budget_plan: SweepPlan | None,
                          fixed: frozenset[str]) -> tuple[str, ...]:
    """The depths whose feature cache the plan weighed and found not to pay for its build:
    their trials read none. None of them without a plan, or when the user set
    `train.feature_cache` (theirs wins)."""
    if budget_plan is None or "train.feature_cache" in fixed:
        return ()
    return tuple(d for d in budget_plan.costs.cache_build_s if d not in budget_plan.cached)


def last_line(budget_plan: SweepPlan, started_at: float, trials: int) -> str:
    return planned_vs_actual(budget_plan, time.time() - started_at, trials)
