"""The sweep: Ray Tune over learning rate x freeze depth (and any other field) with ASHA.

`sweep(cfg)` answers the transfer-learning question "how much of the pretrained network
should I keep, at what learning rate?". Each trial is one training run
(`tlray.tune.trial.run_trial`), launched from a Tune function trainable (the Train V2
pattern: every epoch's report reaches Tune, so ASHA can stop weak trials early). MLflow gets
one parent run per sweep with a nested child run per trial; the best completed trial's
model (already tested on the test split and logged by its trial) is registered, and the
`champion` alias moves only when its test metric beats the current champion's
(`tlray.tune.pick`).

A sweep lives in `<storage>/<name>`; `resume=True` continues an interrupted one without
re-running finished trials, under the same MLflow parent run (`tlray.tune.state`).
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import time
from dataclasses import dataclass

from tlray import config as config_mod
from tlray.config import Config
from tlray.config.interval import parse_budget
from tlray.config.schedule import first_depth
from tlray.errors import Paused, TlrayError
from tlray.track import registry
from tlray.track.datasets import log_datasets
from tlray.track.figures import log_samples
from tlray.track.params import log_config
from tlray.track.runs import close_dangling_runs, start_run
from tlray.train.launch import read_splits
from tlray.train.lr_find import log_curves, lr_find, range_from
from tlray.train.plan import Plan, preflight
from tlray.train.protocol import is_final, is_partial
from tlray.tune.budget_guard import BudgetGuard, GuardedSearch, GuardedVariants
from tlray.tune.budgeted import (last_line, plan_to_budget, trial_deadline,
                                 trial_uncached_depths, trials_in_time_left)
from tlray.tune.clock import SweepClock, clock_callback
from tlray.tune.goal import Goal
from tlray.tune.importance import distributions, importance
from tlray.tune.pause import PauseOnCtrlC, command_line, resume_command
from tlray.tune.pick import (NO_TIME, NOT_STARTED, SweepResult, describe_trials, log_sweep,
                             pick_and_register)
from tlray.tune.space import freeze_choices, more_trials, search_space, spread_trials
from tlray.tune.state import SweepState, locate
from tlray.tune.trial import concurrency, run_trial, share_gpus, trial_resources


def sweep(cfg: Config, *, resume: bool = False, more: int = 0,
          points: list[dict] | None = None, fixed: frozenset[str] = frozenset(),
          started_at: float | None = None) -> SweepResult:
    """Runs, resumes or grows a sweep and registers its winner; see the module docstring.

    Args:
        resume: continue the latest unfinished sweep (or `tune.name`) where it stopped.
        more: add this many trials to the latest sweep, finished or not, continuing its
            stratified design (`space.more_trials`); its finished trials are kept.
        points: exactly these trials (`section.key` -> value each) instead of a search,
            e.g. the configs a sweep stopped early, trained to the end (`--regret`).
        fixed: settings the user gave, which a `tune.budget` plan keeps (`budgeted.FIXABLE`).
        started_at: `time.time()` when the command started: a budget counts from there
            (default: now).
    """
    from ray import tune

    started_at = time.time() if started_at is None else started_at
    if more < 0:
        raise TlrayError(f"--more: expected a number of trials to add, got {more}")
    plan = preflight(cfg, plan_cache=False)  # each trial plans the cache of its own depth
    choices = freeze_choices(plan.config, plan.model.group_names)
    curves = []
    if "auto" in (plan.config.tune.lr_min, plan.config.tune.lr_max):
        plan, curves = _lr_range_from_tests(plan, choices)
    budget_plan = None
    if parse_budget(plan.config.tune.budget) and not (resume or more or points):
        plan, choices, budget_plan = plan_to_budget(plan, choices, fixed, started_at)
    space = search_space(plan.config, choices)
    plan = dataclasses.replace(plan, config=share_gpus(plan.config))
    cfg, info = plan.config, plan.dataset
    # Keeping only the best checkpoints makes Tune save its experiment state after each
    # deletion, and warn about it every few seconds; a small JSON file, not a bottleneck.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    state = locate(cfg, info, plan.storage, resume=resume, grow=more > 0)
    registered_name = cfg.tune.registered_name or registry.default_registered_name(
        info.name, cfg.model.backbone)
    tags = {"sweep": state.name, "dataset": info.name, "backbone": cfg.model.backbone,
            "weights": cfg.model.weights, "dataset_hash": info.fingerprint,
            "augmentation": plan.augment_note}
    goal = Goal(cfg.train.monitor, cfg.monitor_mode, cfg.tune.goal)
    guard = BudgetGuard(budget_plan, started_at) if budget_plan else None
    with start_run(plan.experiment, run_name=state.name, tags=tags,
                   run_id=state.parent_run_id) as parent:
        if state.parent_run_id is None:
            _log_sweep_settings(cfg, space)
            # The splits, recorded here first: trials that start together would each
            # insert the same dataset rows, and MLflow's store refuses the second.
            log_datasets(info)
            log_samples(info)
        if curves:
            log_curves(curves)
        state.parent_run_id, state.finished = parent.info.run_id, False
        state.write(plan.storage)
        # Every trial trains on the same splits: read once, here (see launch.read_splits).
        part = _Part(plan, state, goal, guard, choices, space, tune.with_resources(
            tune.with_parameters(run_trial, plan=plan, parent_run_id=state.parent_run_id,
                                 images=read_splits(cfg, info),
                                 command=shlex.join(command_line()),
                                 deadline=trial_deadline(budget_plan, started_at, fixed),
                                 uncached_depths=trial_uncached_depths(budget_plan, fixed)),
            trial_resources(cfg)))
        results = [r for name in list(state.parts) for r in part.run(name, points)]
        done = [r.config for r in results if r.metrics]
        grows = guard is not None and "tune.num_samples" not in fixed  # the plan's count
        extra = (more_trials(cfg, choices, done, more) if more else
                 trials_in_time_left(guard, cfg, choices, done) if grows else [])
        if extra:
            state.parts.append(f"{state.name}-more{len(state.parts)}")
            results += part.run(state.parts[-1], extra)
        if guard:  # and every planned trial that did not start for want of time
            results += guard.not_started((trial_design(cfg, choices, points) or []) + extra)
        outcome = pick_and_register(cfg, info, results, state.parent_run_id, registered_name,
                                    goal)
        ranked, study, note = importance(outcome["trials"], distributions(cfg, choices),
                                         cfg.train.monitor, cfg.monitor_mode)
        log_sweep(outcome["trials"], cfg.train.monitor, ranked, study)
        describe_trials(outcome["trials"], cfg.train.monitor, outcome["best_run_id"])
        state.finished = True
        state.write(plan.storage)
    if budget_plan is not None:
        ran = sum(t["status"] not in (NO_TIME, NOT_STARTED) for t in outcome["trials"])
        print(last_line(budget_plan, started_at, ran), flush=True)
    return SweepResult(name=state.name, path=f"{plan.storage.rstrip('/')}/{state.name}",
                       parent_run_id=state.parent_run_id, registered_name=registered_name,
                       importance=ranked, importance_note=note, **outcome)


@dataclass
class _Part:
    """Runs one part (one Tune experiment) of a sweep: a new one, the rest of an
    interrupted one, or, for a part already done, just its results."""

    plan: Plan
    state: SweepState
    goal: Goal
    guard: BudgetGuard | None
    choices: list[str]
    space: dict
    trainable: object

    def run(self, name: str, points: list[dict] | None) -> list:
        from ray import tune

        path = f"{self.plan.storage.rstrip('/')}/{name}"
        if name in self.state.done:
            return list(tune.Tuner.restore(path, trainable=self.trainable).get_results())
        if tune.Tuner.can_restore(path):
            tuner = tune.Tuner.restore(path, trainable=self.trainable, resume_unfinished=True,
                                       resume_errored=True)
        else:
            self.state.write(self.plan.storage)  # the part is known before it starts
            tuner = _new_tuner(self.plan, self.trainable, self.space, self.choices, name,
                               points, self.goal, self.guard)
        with PauseOnCtrlC() as pause:
            try:
                results = list(tuner.fit())
            finally:  # trials Tune stopped (ASHA, the goal, Ctrl-C) could not end their runs
                close_dangling_runs(parent_run_id=self.state.parent_run_id,
                                    status="KILLED")
        if pause.paused:
            saved = sum(1 for r in results if r.checkpoint is not None)
            planned = max(len(results), trial_count(self.plan.config, points))
            raise Paused(f"interrupted: {saved} of {planned} trials have progress saved; "
                         f"continue with: {resume_command()}")
        self.state.done.append(name)
        self.state.write(self.plan.storage)
        return results


def _lr_range_from_tests(plan: Plan, choices: list[str]) -> tuple[Plan, list]:
    """`tune.lr_min=auto` / `lr_max=auto`: the range from a learning-rate range test of
    every freeze depth the sweep tries (a schedule's first phase)."""
    depths = list(dict.fromkeys(first_depth(c) for c in choices))
    print(f"sweep: finding the learning-rate range (freeze {', '.join(depths)})", flush=True)
    curves = lr_find(plan, depths)
    low, high = range_from(curves, plan.config.tune.lr_min, plan.config.tune.lr_max)
    print(f"sweep: learning rates {low:.2g} .. {high:.2g} (suggested: " + ", ".join(
        f"{c.suggestion:.2g} at freeze {c.freeze}" for c in curves) + ")", flush=True)
    cfg = config_mod.with_overrides(plan.config, **{"tune.lr_min": low, "tune.lr_max": high})
    return dataclasses.replace(plan, config=cfg), curves


def trial_design(cfg: Config, choices: list[str], points: list[dict] | None) -> list | None:
    """The trials a sweep runs, in order, when they are known before it starts: the points
    given, or the stratified design; None for a search that draws them as it goes."""
    if points or cfg.tune.search != "stratified":
        return points or None
    return spread_trials(cfg, choices)


def trial_count(cfg: Config, points: list[dict] | None) -> int:
    return len(points) if points else cfg.tune.num_samples


def _log_sweep_settings(cfg: Config, space: dict) -> None:
    import mlflow

    log_config(cfg.to_dict())
    mlflow.log_dict({k: repr(v) for k, v in space.items()}, "search_space.json")
    mlflow.log_params({"sweep.metric": cfg.train.monitor, "sweep.mode": cfg.monitor_mode,
                       "sweep.scheduler": "ASHA", "sweep.search": cfg.tune.search})


def _new_tuner(plan: Plan, trainable, space: dict, choices: list[str], name: str,
               points: list[dict] | None, goal: Goal, guard: BudgetGuard | None = None):
    """A Tuner for a new sweep: ASHA over epochs, the seeded search, the remaining-time line,
    the goal and the budget."""
    from ray import tune
    from ray.tune.stopper import CombinedStopper

    cfg = plan.config
    metric, mode = cfg.train.monitor, cfg.monitor_mode
    trials = trial_count(cfg, points)
    at_once = concurrency(cfg)
    points = trial_design(cfg, choices, points)
    kinds = [str(p["model.freeze"]) for p in points] if points else None
    scheduler = epoch_asha(cfg.train.epochs, cfg.tune.grace_period, cfg.tune.reduction_factor,
                           goal)
    return tune.Tuner(
        trainable, param_space=space,
        tune_config=tune.TuneConfig(
            metric=metric, mode=mode, scheduler=scheduler, num_samples=trials,
            # The next trial starts in the process the last one ended in (torch, timm,
            # tlray imported).
            reuse_actors=True,
            search_alg=_search_alg(cfg, metric, mode, at_once, points, guard)),
        run_config=tune.RunConfig(
            name=name, storage_path=plan.storage,
            callbacks=[clock_callback(SweepClock(trials, cfg.train.epochs, at_once, kinds)),
                       goal, *([guard] if guard else [])],
            stop=CombinedStopper(goal, guard) if guard else goal,
            # Checkpoints of trials that train in their own process (see run_trial).
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=cfg.train.keep_checkpoints,
                checkpoint_score_attribute=metric, checkpoint_score_order=mode),
            failure_config=tune.FailureConfig(max_failures=cfg.tune.max_failures)))


def _search_alg(cfg: Config, metric: str, mode: str, max_concurrent: int,
                points: list[dict] | None = None, guard: BudgetGuard | None = None):
    """Seeded search, at most `max_concurrent` trials at once (Tune ignores its own
    max_concurrent_trials for a search generator passed in, hence here), creating no trial
    that the budget's `guard` refuses.

    Args:
        points: the trials to run (a stratified design, or given), in order; None draws them.
    """
    if points or cfg.tune.search in ("stratified", "random"):
        # Tune runs the given points first, each one trial, drawing any field they leave out.
        return GuardedVariants(guard, points_to_evaluate=points, random_state=cfg.tune.seed,
                               max_concurrent=max_concurrent)
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    return GuardedSearch(guard, ConcurrencyLimiter(
        OptunaSearch(metric=metric, mode=mode, seed=cfg.tune.seed),
        max_concurrent=max_concurrent))


def epoch_asha(epochs: int, grace_period: int, reduction_factor: int, goal: Goal):
    """ASHA whose clock is the epoch each report carries and whose `max_t` is the epoch count.

    It decides only at rungs before the last epoch: a trial that has trained every epoch
    goes on to its test and the logging of its model (stopping it then would throw both
    away), and a trial's final report is never a decision point. A grace period of at least
    `epochs` stops nothing. Once the sweep's `goal` is reached, no trial starts.
    """
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    class EpochASHA(ASHAScheduler):
        def on_trial_result(self, tune_controller, trial, result: dict) -> str:
            if is_final(result) or is_partial(result) or result.get("epoch", 0) >= self._max_t:
                return TrialScheduler.CONTINUE
            return super().on_trial_result(tune_controller, trial, result)

        def choose_trial_to_run(self, tune_controller):
            if goal.reached:
                return None
            return super().choose_trial_to_run(tune_controller)

    return EpochASHA(time_attr="epoch", max_t=epochs, grace_period=min(grace_period, epochs),
                     reduction_factor=reduction_factor)
